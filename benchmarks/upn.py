"""UPN: multi-scale deformable attention against the PyTorch grid_sample path, and the whole UPN-L.

Deformable attention cases (UPN-Large sizes: d_model 256 = 8 heads x 32, 4 points, the five
levels of an 800 x 1129 input: 200x283, 100x142, 50x71, 25x36, 13x18 = 75,484 tokens):
  encoder_local    every token a query, sampling around its own position on every level
                   (Deformable DETR's initial offsets, head direction x (point + 1) pixels, plus
                   noise): the encoder's access pattern
  encoder_uniform  every token a query, uniform random locations: the worst case for caches
  encoder_local_bwd  encoder_local forward + backward (training the encoder)
  decoder          900 queries, forward (inference)
  decoder_bwd      900 queries, forward + backward (training; grads for value, locations, weights)
Beside each: a memory-traffic floor, the bytes that must move at least once (value, locations,
weights, output) over this machine's measured copy bandwidth, and the bytes the sampled
windows cover (4 corners x 32 channels per sample: what a gather touches) at that bandwidth.

`--whole` times the whole UPN-L forward (random weights, fp32) at 800 x 1129, batch 1 and 2:
compile time, median step, peak memory (each batch in a fresh process: `peak_mb` above the
resident weights, inputs and runtime, `process_peak_mb` the whole process), one more run's
system time and minor page faults per part (`*_system_s`, `*_page_faults`), and the parts by
difference where they cannot be called alone (the encoder with its input projections = encode -
backbone); the decoder (query selection, decoder, heads) is timed on the encoder's output.
The official UPN needs its CUDA extension and is not installable here; it is compared
separately (README).

Both sides get identical inputs, run after warm-up, and report the median of several runs;
peak memory is the resident-set high-water mark above the level before each run (sampled every
millisecond). One JSON line per case; the last line is the encoder_local case with the others
nested under "cases".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # as the other benchmarks: no accelerator probing

import jax  # noqa: E402
import jax.numpy as jnp
from measure import PeakRSS
import numpy as np
import torch

from chatrex_jax.ops.ms_deform_attn import ms_deform_attn
from chatrex_jax.testing import torch_ms_deform_attn_core

LEVELS = ((200, 283), (100, 142), (50, 71), (25, 36), (13, 18))
HEADS, HEAD_DIM, POINTS = 8, 32, 4


def timed(fn, repeats):
  fn()  # warm-up (compiles ours)
  times, peaks = [], []
  for _ in range(repeats):
    with PeakRSS() as mem:
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    peaks.append(mem.mb)
  return statistics.median(times), max(peaks)


def copy_bandwidth_gbs() -> float:
  """Read + write GB/s of a 1 GB numpy copy (best of 3): the machine's streaming bandwidth."""
  a = np.ones(2**28, np.float32)
  b = np.empty_like(a)
  best = 0.0
  for _ in range(3):
    t = time.perf_counter()
    np.copyto(b, a)
    best = max(best, 2 * a.nbytes / (time.perf_counter() - t) / 1e9)
  return best


def inputs(shapes, q, pattern, seed=0):
  rng = np.random.default_rng(seed)
  s = sum(h * w for h, w in shapes)
  value = rng.standard_normal((1, s, HEADS, HEAD_DIM), np.float32)
  if pattern == "local":  # query i is token i; it samples around its own centre on every level
    centres = np.concatenate([np.stack(np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h),
                                       -1).reshape(-1, 2) for h, w in shapes])[:q]
    angle = np.arange(HEADS) * 2 * np.pi / HEADS
    direction = np.stack([np.cos(angle), np.sin(angle)], -1)
    direction /= np.abs(direction).max(-1, keepdims=True)
    pixels = (direction[:, None, :] * (np.arange(POINTS) + 1)[None, :, None])[None, :, None]
    pixels = pixels + rng.normal(0, 1.0, (q, HEADS, len(shapes), POINTS, 2))
    size = np.asarray([[w, h] for h, w in shapes], np.float32)[None, None, :, None, :]
    loc = (centres[:, None, None, None, :] + pixels / size)[None].astype(np.float32)
  else:
    loc = rng.uniform(-0.05, 1.05, (1, q, HEADS, len(shapes), POINTS, 2)).astype(np.float32)
  logits = rng.standard_normal((1, q, HEADS, len(shapes) * POINTS)).astype(np.float32)
  attn = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).reshape(
      1, q, HEADS, len(shapes), POINTS)
  return value, loc, attn


def traffic(value, loc, attn, q, backward):
  """(bytes that must move at least once, bytes of the sampled windows)."""
  must = value.nbytes + loc.nbytes + attn.nbytes + q * HEADS * HEAD_DIM * 4
  if backward:  # the gradients are written, the cotangent read
    must = 2 * must + q * HEADS * HEAD_DIM * 4
  windows = attn.size * 4 * HEAD_DIM * 4
  return must, windows


def run_case(name, q, pattern, backward, repeats, bandwidth):
  value, loc, attn = inputs(LEVELS, q, pattern)
  tv, tl, ta = (torch.from_numpy(x) for x in (value, loc, attn))
  jv, jl, ja = (jnp.asarray(x) for x in (value, loc, attn))
  cot = np.random.default_rng(1).standard_normal((1, q, HEADS * HEAD_DIM)).astype(np.float32)
  if backward:
    # The cotangent is an argument: a closed-over array becomes a constant that XLA folds.
    grad = jax.jit(jax.grad(lambda v, l, a, g: jnp.sum(ms_deform_attn(v, LEVELS, l, a) * g),
                            argnums=(0, 1, 2)))
    jcot = jnp.asarray(cot)

    def ours():
      jax.block_until_ready(grad(jv, jl, ja, jcot))

    def ref():
      v, l, a = (t.clone().requires_grad_(True) for t in (tv, tl, ta))
      (torch_ms_deform_attn_core(v, LEVELS, l, a) * torch.from_numpy(cot)).sum().backward()
    got = grad(jv, jl, ja, jcot)[0]
    v = tv.clone().requires_grad_(True)
    (torch_ms_deform_attn_core(v, LEVELS, tl, ta) * torch.from_numpy(cot)).sum().backward()
    err = float(np.abs(np.asarray(got) - v.grad.numpy()).max())
  else:
    fwd = jax.jit(lambda v, l, a: ms_deform_attn(v, LEVELS, l, a))

    def ours():
      jax.block_until_ready(fwd(jv, jl, ja))

    def ref():
      with torch.no_grad():
        torch_ms_deform_attn_core(tv, LEVELS, tl, ta)
    with torch.no_grad():
      want = torch_ms_deform_attn_core(tv, LEVELS, tl, ta).numpy()
    err = float(np.abs(np.asarray(fwd(jv, jl, ja)) - want).max())
  ours_s, ours_mb = timed(ours, repeats)
  ref_s, ref_mb = timed(ref, repeats)
  must, windows = traffic(value, loc, attn, q, backward)
  return {"name": f"upn_msdeform_attn_{name}",
          "config": {"levels": [list(s) for s in LEVELS], "queries": q, "heads": HEADS,
                     "head_dim": HEAD_DIM, "points": POINTS, "locations": pattern,
                     "backward": backward, "device": jax.devices()[0].platform,
                     "torch_threads": torch.get_num_threads()},
          "ours_s": ours_s, "ref_s": ref_s, "speedup": ref_s / ours_s,
          "ours_peak_mb": ours_mb, "ref_peak_mb": ref_mb, "max_abs_err": err,
          "floor_s": must / (bandwidth * 1e9), "floor_mb": must / 1e6,
          "sampled_windows_mb": windows / 1e6, "windows_at_bandwidth_s": windows / (bandwidth * 1e9),
          "copy_bandwidth_gbs": bandwidth}


def whole_upn(batches, repeats, height=800, width=1129):
  from measure import kernel_cost, median_time, peak_rss_mb, reset_peak

  from chatrex_jax.configs import upn_large
  from chatrex_jax.models.upn.upn import UPN, UPNConfig
  from chatrex_jax.ops.ms_deform_attn import level_start_index
  model = UPN(UPNConfig.from_config_dict(upn_large.get_config().model))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 3), jnp.float32))
  statics = ("spatial_shapes", "level_start_index")
  rows = []
  for b in batches:
    images = jax.random.normal(jax.random.PRNGKey(b), (b, height, width, 3), jnp.float32)
    row = {"name": "upn_large_forward", "config": {"batch": b, "height": height, "width": width,
                                                   "dtype": "float32", "repeats": repeats}}
    reset_peak()
    base = peak_rss_mb()  # weights, inputs and the runtime

    def measure(part, fn, *args, row=row):
      t = time.perf_counter()
      compiled = jax.jit(fn).lower(*args).compile()
      row[f"{part}_compile_s"] = time.perf_counter() - t
      out = jax.block_until_ready(compiled(*args))  # the first run is not timed
      row[f"{part}_s"] = median_time(lambda: jax.block_until_ready(compiled(*args)), repeats)
      # One more run's kernel time and minor page faults: memory mapped afresh per call (buffers
      # above glibc's 32 MB mmap threshold, the executable's scratch among them) shows here.
      row[f"{part}_system_s"], row[f"{part}_page_faults"] = kernel_cost(
          lambda: jax.block_until_ready(compiled(*args)))
      return out

    measure("backbone", lambda p, x: model.apply(p, x, method=lambda m, x: m.backbone(x)),
            params, images)
    enc = measure("encode", lambda p, x: {k: v for k, v in model.apply(p, x, method=UPN.encode).items()
                                          if k not in statics}, params, images)
    shapes = tuple((f.shape[1], f.shape[2]) for f in enc["backbone_feats"])
    spatial = shapes + (((shapes[-1][0] + 1) // 2, (shapes[-1][1] + 1) // 2),)  # 3x3 conv, stride 2
    assert sum(h * w for h, w in spatial) == enc["memory"].shape[1], spatial
    static = {"spatial_shapes": spatial, "level_start_index": level_start_index(spatial)}
    measure("decoder", lambda p, e, static=static: model.apply(
        p, {**e, **static}, "fine_grained_prompt", method=UPN.decode)["pred_boxes"], params, enc)
    del enc
    measure("full", lambda p, x: model.apply(p, x)["pred_boxes"], params, images)
    row["encoder_s"] = row["encode_s"] - row["backbone_s"]
    row["peak_mb"] = peak_rss_mb() - base
    row["process_peak_mb"] = peak_rss_mb()
    # docs/architecture.md "Benchmarks output format"; no reference runs here (see above).
    row.update(ours_s=row["full_s"], ref_s=None, speedup=None, ours_peak_mb=row["process_peak_mb"],
               ref_peak_mb=None, max_abs_err=None)
    rows.append(row)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--whole", action="store_true", help="time the whole UPN-L forward instead")
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  if args.whole:
    if len(args.batches) > 1:  # one fresh process per batch: no memory left over from another
      for b in args.batches:
        subprocess.run([sys.executable, __file__, "--whole", "--batches", str(b),
                        "--repeats", str(args.repeats)], check=True)
      return
    for row in whole_upn(args.batches, args.repeats):
      print(json.dumps(row), flush=True)
    return
  bandwidth = copy_bandwidth_gbs()
  tokens = sum(h * w for h, w in LEVELS)
  with jax.default_matmul_precision("highest"):
    results = [run_case(*case, bandwidth) for case in (
        ("encoder_local", tokens, "local", False, args.repeats),
        ("encoder_uniform", tokens, "uniform", False, args.repeats),
        ("encoder_local_bwd", tokens, "local", True, args.repeats),
        ("decoder", 900, "uniform", False, 2 * args.repeats + 1),
        ("decoder_bwd", 900, "uniform", True, 2 * args.repeats - 1))]
  for r in results:
    print(json.dumps(r))
  # The last line (docs/architecture.md "Benchmarks output format"): the encoder case, the
  # others nested under "cases".
  print(json.dumps({**results[0], "cases": results[1:]}))


if __name__ == "__main__":
  main()
