"""LLM benchmark: ours (jitted JAX) vs PyTorch/transformers on identical weights and inputs.

  python benchmarks/llm.py            # ~125M-parameter Qwen2-style config (slow on 2 cores)
  python benchmarks/llm.py --quick    # tiny config, smoke test

Measures (each side in its own fresh subprocess, so peak memory is that side's alone, read as
the kernel's peak RSS `VmHWM` after resetting it):
  train: forward + backward (mean token cross-entropy) at batch B x T;
  gen1 / gen8: greedy generation of N new tokens at batch 1 and 8 vs HF `generate`
    (no EOS stop, KV cache on both sides), reported in tokens/s.
Prints one JSON line per measurement; the last line is the train-step summary
(docs/architecture.md "Benchmarks output format").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from measure import median_time, reset_peak, status_mb

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
  if args.task == "train":
    ids = rng.integers(1, v, (args.batch, args.seq))
  else:
    ids = rng.integers(1, v, (args.batch, args.prompt))
  base = status_mb("VmRSS")
  reset_peak()
  result = {}
  if args.side == "ours":
    import jax
    import jax.numpy as jnp

    from chatrex_jax.convert import llm as llm_convert
    from chatrex_jax.inference.generate import SamplingConfig, generate
    from chatrex_jax.models.llm import CausalLM
    config, params = llm_convert.load(args.ckpt)
    params = jax.device_put(params)
    model = CausalLM(config)
    if args.task == "train":
      x = jnp.asarray(ids)

      @jax.jit
      def step(p, x):
        def loss_fn(p):
          logits = model.apply({"params": p}, x[:, :-1])["logits"]
          logp = jax.nn.log_softmax(logits, axis=-1)
          return -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], axis=-1))
        return jax.value_and_grad(loss_fn)(p)
      fn = lambda: jax.block_until_ready(step(params, x))
      result["value"] = float(step(params, x)[0])
    else:
      sampling = SamplingConfig(max_new_tokens=args.new_tokens)
      fn = lambda: generate(model, params, input_ids=ids, sampling=sampling)
      result["tokens"] = fn().tokens.tolist()
  else:
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    model = transformers.AutoModelForCausalLM.from_pretrained(args.ckpt, attn_implementation="sdpa")
    x = torch.tensor(ids)
    if args.task == "train":
      model.train()

      def fn():
        model.zero_grad(set_to_none=True)
        logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
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
  print(json.dumps(result))


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
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**{k: v for k, v in hf_cfg.items() if k != "model_type"})
    model = transformers.Qwen2ForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    name = "llm_quick" if args.quick else "llm_125m"
    lines = []
    for task, batch in (("gen", 1), ("gen", 8), ("train", args.batch)):
      ours = run_child("ours", task, tmp, args, batch=batch)
      ref = run_child("ref", task, tmp, args, batch=batch)
      line = {"name": f"{name}_{task}{batch if task == 'gen' else ''}",
              "config": dict(params_m=round(n_params / 1e6, 1), batch=batch,
                             **({"seq": args.seq} if task == "train" else
                                {"prompt": args.prompt, "new_tokens": args.new_tokens})),
              "ours_s": ours["seconds"], "ref_s": ref["seconds"],
              "speedup": ref["seconds"] / ours["seconds"],
              "ours_peak_mb": round(ours["peak_mb"], 1), "ref_peak_mb": round(ref["peak_mb"], 1)}
      if task == "train":
        line["max_abs_err"] = abs(ours["value"] - ref["value"])  # loss difference
      else:
        tokens_match = np.mean(np.asarray(ours["tokens"]) == np.asarray(ref["tokens"]))
        line["ours_tokens_per_s"] = batch * args.new_tokens / ours["seconds"]
        line["ref_tokens_per_s"] = batch * args.new_tokens / ref["seconds"]
        line["token_agreement"] = float(tokens_match)
        line["max_abs_err"] = float(1.0 - tokens_match)
      lines.append(line)
      print(json.dumps(line), flush=True)


if __name__ == "__main__":
  main()
