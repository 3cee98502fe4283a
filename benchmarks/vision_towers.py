"""Vision towers: ours (jitted Flax) vs PyTorch, identical random weights, one process.

  python benchmarks/vision_towers.py            # CLIP ViT-L/14 @336 and ConvNeXt-L @768, batch 1 and 4
  python benchmarks/vision_towers.py --quick    # small configs (smoke test, ~1 min)

Cases (docs/architecture.md B.3/B.4):
* clip: transformers `CLIPVisionModel` (ViT-L/14-336 config) run as RexSeek's `CLIPVisionTower`
  does: `output_hidden_states=True`, `hidden_states[-2][:, 1:]` (all 24 layers run). Ours:
  `CLIPVisionTower(select_layer=-2)`, which runs only the 23 layers the features need
  (`clip_full` repeats it with all hidden states, i.e. all 24 layers, for a like-for-like time;
  `--clip-variants` picks which run).
* convnext: the trunk of open_clip `convnext_large_d_320` (= timm `convnext_large`) run as
  RexSeek's `ConvNextVisionEncoder` does (stem, then the 4 stages, every stage map kept).
  Ours: `ConvNeXt` (NHWC, depthwise conv as fused shifted multiply-adds on CPU).
Weights: the torch module's random init, perturbed (LayerNorm affines, layer scales ~ U(0.05,
0.15)) so every block matters, converted with the project's converters. Torch runs under
`torch.inference_mode()` with its default threads; XLA with its default thread pool.

Time: after warm-up (and, for ours, compilation), median of --repeats runs.
Peak memory (same method for both sides, each in a fresh subprocess so no allocator cache from
earlier runs hides anything): the child builds the model, weights and input, (ours) compiles,
resets the process's high-water mark to the current RSS (/proc/self/clear_refs "5", Linux),
runs one forward and reports `VmHWM - RSS_before` = the memory the forward needed on top of
weights and input. `ours_xla_temp_mb` (per case) is XLA's own buffer plan
(`memory_analysis()`: temp + output bytes) for comparison.
max_abs_err: max |ours - torch| over the compared outputs; per case also relative to the
output scale (max |torch|).
The CPU is shared with other work, so numbers are indicative. The last line is one JSON object
(docs/architecture.md "Benchmarks output format") aggregating the cases (sums of median times,
max of peaks and errors), with the per-case numbers under "cases".
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from measure import median_time, peak_mb

from chatrex_jax.convert import clip as clip_convert  # noqa: E402
from chatrex_jax.convert import convnext as cx_convert  # noqa: E402
from chatrex_jax.models import clip_vit, convnext  # noqa: E402

CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLIP_QUICK = dict(CLIP_L, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, image_size=224)
CX_L = dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), size=768)
CX_QUICK = dict(depths=(1, 1, 3, 1), dims=(48, 96, 192, 384), size=256)


def _perturb(module, seed: int, sigma: float = 0.02):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("gamma"):
        p.copy_(0.05 + 0.1 * torch.rand(p.shape, generator=g))
      else:
        p.add_(sigma * torch.randn(p.shape, generator=g))
  return module.eval()


def _xla_temp_mb(jitted, *args) -> float:
  try:
    m = jitted.lower(*args).compile().memory_analysis()
    return (m.temp_size_in_bytes + m.output_size_in_bytes) / 2**20
  except Exception:  # memory_analysis is optional per backend
    return float("nan")


def _case(name, config, ours_fn, ref_fn, ours_args, compare, repeats, xla_mb, mem_args):
  jax.block_until_ready(ours_fn(*ours_args))           # compile + warm-up
  with torch.inference_mode():
    ref_fn()
    ref_s = median_time(ref_fn, repeats)
    ref_out = ref_fn()
  ours_s = median_time(lambda: jax.block_until_ready(ours_fn(*ours_args)), repeats)
  abs_err, rel_err = compare(ours_fn(*ours_args), ref_out)
  ours_peak, ref_peak = (_child_peak(side, *mem_args) for side in ("ours", "ref"))
  row = {"name": name, "config": config, "ours_s": round(ours_s, 4), "ref_s": round(ref_s, 4),
         "speedup": round(ref_s / ours_s, 3), "ours_peak_mb": round(ours_peak, 1),
         "ref_peak_mb": round(ref_peak, 1), "max_abs_err": abs_err, "max_rel_err": rel_err,
         "ours_xla_temp_mb": round(xla_mb, 1)}
  print(json.dumps(row), flush=True)
  return row


def _child_peak(side: str, tower: str, quick: bool, batch: int, full: bool = False) -> float:
  import subprocess
  cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", side, "--towers", tower,
         "--batches", str(batch)] + (["--quick"] if quick else []) + (["--full-clip"] if full else [])
  out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode != 0:
    print(out.stderr[-2000:], file=sys.stderr)
    return float("nan")
  return float(out.stdout.strip().splitlines()[-1])


def memory_child(side: str, tower: str, quick: bool, batch: int, full: bool) -> None:
  """Prints the peak extra memory (MB) of one forward of `side` (weights/input excluded)."""
  from flax.core import meta
  if tower == "clip":
    hf_kw = CLIP_QUICK if quick else CLIP_L
    cfg = clip_vit.CLIPVisionConfig.from_hf(hf_kw, select_layer=-2)
    x = np.zeros((batch, 3, cfg.image_size, cfg.image_size), np.float32)
    if side == "ref":
      import transformers
      ref = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**hf_kw)).eval()
      xt = torch.from_numpy(x)
      fn = lambda: ref(xt, output_hidden_states=True).hidden_states[-2][:, 1:]  # noqa: E731
    else:
      model = clip_vit.CLIPVisionTower(cfg)
      xj = jnp.asarray(x.transpose(0, 2, 3, 1))
      out = "all" if full else "features"
      apply = jax.jit(lambda p, x: model.apply({"params": p}, x, output=out))
  else:
    spec = CX_QUICK if quick else CX_L
    cfg = convnext.ConvNeXtConfig(depths=spec["depths"], dims=spec["dims"])
    x = np.zeros((batch, 3, spec["size"], spec["size"]), np.float32)
    if side == "ref":
      import timm
      trunk = timm.models.convnext.ConvNeXt(depths=spec["depths"], dims=spec["dims"]).eval()
      xt = torch.from_numpy(x)

      def fn():
        h, outs = trunk.stem(xt), []
        for stage in trunk.stages:
          h = stage(h)
          outs.append(h)
        return outs
    else:
      model = convnext.ConvNeXt(cfg)
      xj = jnp.asarray(x.transpose(0, 2, 3, 1))
      apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  if side == "ours":
    shapes = meta.unbox(jax.eval_shape(model.init, jax.random.key(0), xj))["params"]
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    compiled = apply.lower(params, xj).compile()
    fn = lambda: jax.block_until_ready(compiled(params, xj))  # noqa: E731
  with torch.inference_mode():
    print(peak_mb(fn))


def _errs(pairs):
  abs_err, scale = 0.0, 0.0
  for got, want in pairs:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    abs_err = max(abs_err, float(np.max(np.abs(got - want))))
    scale = max(scale, float(np.max(np.abs(want))))
  return abs_err, abs_err / max(scale, 1e-30)


def bench_clip(hf_kw: dict, batches, repeats: int, variants=("pruned", "full")) -> list[dict]:
  quick = hf_kw is CLIP_QUICK
  import transformers
  torch.manual_seed(0)
  ref = _perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**hf_kw)), 1)
  state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  rows = []
  for full in [v == "full" for v in variants]:
    cfg = clip_vit.CLIPVisionConfig.from_hf(hf_kw, select_layer=-2)
    model = clip_vit.CLIPVisionTower(cfg)
    params = jax.device_put(clip_convert.to_flax(state, cfg))
    if full:
      fwd = jax.jit(lambda p, x, m=model: m.apply({"params": p}, x, output="all")["features"])
    else:
      fwd = jax.jit(lambda p, x, m=model: m.apply({"params": p}, x))
    for b in batches:
      x = np.random.default_rng(b).standard_normal((b, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
      xt = torch.from_numpy(x)
      xj = jnp.asarray(x.transpose(0, 2, 3, 1))

      def ref_fn(xt=xt):
        return ref(xt, output_hidden_states=True).hidden_states[-2][:, 1:]
      rows.append(_case(
          "clip_full" if full else "clip",
          dict(model=f"CLIP ViT (D={cfg.hidden_size}, L={cfg.num_hidden_layers}) @{cfg.image_size}",
               batch=b, layers_run_ours=cfg.num_hidden_layers if full else cfg.select_index,
               layers_run_ref=cfg.num_hidden_layers),
          fwd, ref_fn, (params, xj), lambda o, r: _errs([(o, r.numpy())]), repeats,
          _xla_temp_mb(fwd, params, xj), ("clip", quick, b, full)))
  return rows


def bench_convnext(spec: dict, batches, repeats: int) -> list[dict]:
  import timm
  torch.manual_seed(0)
  if spec is CX_L:
    import open_clip  # the real trunk class of convnext_large_d_320 (timm convnext_large)
    from open_clip.timm_model import TimmModel
    trunk = TimmModel("convnext_large", embed_dim=768, pool="", proj="mlp", drop=0.0,
                      drop_path=0.1, image_size=320).trunk
    source = f"open_clip {open_clip.__version__} convnext_large_d_320 trunk"
  else:
    trunk = timm.models.convnext.ConvNeXt(depths=spec["depths"], dims=spec["dims"])
    source = "timm ConvNeXt"
  _perturb(trunk, 2)
  cfg = convnext.ConvNeXtConfig(depths=spec["depths"], dims=spec["dims"])
  state = {k: v.detach().numpy() for k, v in trunk.state_dict().items()}
  params = jax.device_put(cx_convert.to_flax(state, cfg, layout="timm"))
  model = convnext.ConvNeXt(cfg)
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
  rows = []
  for b in batches:
    size = spec["size"]
    x = np.random.default_rng(b).standard_normal((b, 3, size, size)).astype(np.float32)
    xt = torch.from_numpy(x)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))

    def ref_fn(xt=xt):
      h = trunk.stem(xt)
      outs = []
      for stage in trunk.stages:
        h = stage(h)
        outs.append(h)
      return outs

    def compare(ours, ref_out):
      return _errs([(np.asarray(o).transpose(0, 3, 1, 2), r.numpy()) for o, r in zip(ours, ref_out)])
    rows.append(_case("convnext", dict(model=f"ConvNeXt depths={list(cfg.depths)} dims={list(cfg.dims)} "
                                             f"@{size} ({source})", batch=b),
                      fwd, ref_fn, (params, xj), compare, repeats, _xla_temp_mb(fwd, params, xj),
                      ("convnext", spec is CX_QUICK, b)))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="small configs, batch 1 and 2")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--towers", default="clip,convnext")
  p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4)")
  p.add_argument("--clip-variants", default="pruned,full",
                 help="pruned: select-layer path (the MLLM's); full: all layers (like-for-like)")
  p.add_argument("--memory-child", choices=["ours", "ref"], help=argparse.SUPPRESS)
  p.add_argument("--full-clip", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.memory_child:
    memory_child(args.memory_child, args.towers, args.quick, int(args.batches), args.full_clip)
    return
  batches = [int(b) for b in (args.batches or ("1,2" if args.quick else "1,4")).split(",")]
  towers = args.towers.split(",")
  rows = []
  with jax.default_matmul_precision("highest"):  # fp32 on CPU either way; explicit for parity
    if "clip" in towers:
      rows += bench_clip(CLIP_QUICK if args.quick else CLIP_L, batches, args.repeats,
                         args.clip_variants.split(","))
    if "convnext" in towers:
      rows += bench_convnext(CX_QUICK if args.quick else CX_L, batches, args.repeats)
  like = [r for r in rows if r["name"] != "clip"] if any(r["name"] == "clip_full" for r in rows) else rows
  ours_s = sum(r["ours_s"] for r in like)
  ref_s = sum(r["ref_s"] for r in like)
  summary = {
      "name": "vision_towers",
      "config": dict(quick=args.quick, batches=batches, towers=towers, torch_threads=torch.get_num_threads(),
                     cpu_count=os.cpu_count(), device=str(jax.devices()[0]),
                     aggregate="like-for-like cases (clip_full, convnext): sums of medians",
                     per_case_speedup={f"{r['name']}@b{r['config']['batch']}": r["speedup"] for r in rows}),
      "ours_s": round(ours_s, 4), "ref_s": round(ref_s, 4), "speedup": round(ref_s / ours_s, 3),
      "ours_peak_mb": max(r["ours_peak_mb"] for r in rows),
      "ref_peak_mb": max(r["ref_peak_mb"] for r in rows),
      "max_abs_err": max(r["max_abs_err"] for r in rows),
      "max_rel_err": max(r["max_rel_err"] for r in rows),
      "cases": rows,
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
