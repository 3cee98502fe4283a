"""UPN multi-scale deformable attention: ours (JAX gather) vs the PyTorch grid_sample path.

Cases (UPN-Large sizes, d_model 256 = 8 heads x 32, 4 points, 5 levels of an 800x1333 image:
200x334, 100x167, 50x84, 25x42, 13x21 = 89,023 tokens):
  decoder      900 queries, forward (inference)
  decoder_bwd  900 queries, forward + backward (training; grads for value, locations, weights)
  encoder      every token of a 512x512 image as a query (21,824), forward
The whole-model comparison is op-level only: the official UPN PyTorch code (and its CUDA
extension) is not installable offline, so there is no PyTorch UPN to time end to end.

Both sides get identical inputs, run after warm-up, and report the median of several runs;
peak memory is the resident-set high-water mark above the level before each run (sampled
every millisecond). Prints one JSON line per case; the last line is the decoder case in the
docs/architecture.md "Benchmarks output format" format (with the other cases nested under "cases").
"""
from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
from measure import PeakRSS
import numpy as np
import torch

from chatrex_jax.ops.ms_deform_attn import ms_deform_attn
from chatrex_jax.testing import torch_ms_deform_attn_core

LEVELS_800 = ((200, 334), (100, 167), (50, 84), (25, 42), (13, 21))
LEVELS_512 = ((128, 128), (64, 64), (32, 32), (16, 16), (8, 8))


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


def inputs(shapes, q, seed=0, n=8, c=32, p=4):
  rng = np.random.default_rng(seed)
  s = sum(h * w for h, w in shapes)
  value = rng.standard_normal((1, s, n, c), np.float32)
  loc = rng.uniform(-0.05, 1.05, (1, q, n, len(shapes), p, 2)).astype(np.float32)
  logits = rng.standard_normal((1, q, n, len(shapes) * p)).astype(np.float32)
  attn = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).reshape(1, q, n, len(shapes), p)
  return value, loc, attn


def run_case(name, shapes, q, backward, repeats):
  value, loc, attn = inputs(shapes, q)
  tv, tl, ta = (torch.from_numpy(x) for x in (value, loc, attn))
  jv, jl, ja = (jnp.asarray(x) for x in (value, loc, attn))
  cot = np.random.default_rng(1).standard_normal((1, q, 256)).astype(np.float32)
  if backward:
    grad = jax.jit(jax.grad(lambda v, l, a: jnp.sum(ms_deform_attn(v, shapes, l, a) * cot), argnums=(0, 1, 2)))

    def ours():
      jax.block_until_ready(grad(jv, jl, ja))

    def ref():
      v, l, a = (t.clone().requires_grad_(True) for t in (tv, tl, ta))
      (torch_ms_deform_attn_core(v, shapes, l, a) * torch.from_numpy(cot)).sum().backward()
    got = grad(jv, jl, ja)[0]
    v = tv.clone().requires_grad_(True)
    (torch_ms_deform_attn_core(v, shapes, tl, ta) * torch.from_numpy(cot)).sum().backward()
    err = float(np.abs(np.asarray(got) - v.grad.numpy()).max())
  else:
    fwd = jax.jit(lambda v, l, a: ms_deform_attn(v, shapes, l, a))

    def ours():
      jax.block_until_ready(fwd(jv, jl, ja))

    def ref():
      with torch.no_grad():
        torch_ms_deform_attn_core(tv, shapes, tl, ta)
    with torch.no_grad():
      err = float(np.abs(np.asarray(fwd(jv, jl, ja)) - torch_ms_deform_attn_core(tv, shapes, tl, ta).numpy()).max())
  ours_s, ours_mb = timed(ours, repeats)
  ref_s, ref_mb = timed(ref, repeats)
  return {"name": f"upn_msdeform_attn_{name}",
          "config": {"levels": [list(s) for s in shapes], "queries": q, "heads": 8, "head_dim": 32,
                     "points": 4, "backward": backward, "device": jax.devices()[0].platform,
                     "torch_threads": torch.get_num_threads()},
          "ours_s": ours_s, "ref_s": ref_s, "speedup": ref_s / ours_s,
          "ours_peak_mb": ours_mb, "ref_peak_mb": ref_mb, "max_abs_err": err}


def main():
  with jax.default_matmul_precision("highest"):
    results = [run_case("encoder_512", LEVELS_512, sum(h * w for h, w in LEVELS_512), False, 3),
               run_case("decoder_bwd", LEVELS_800, 900, True, 5),
               run_case("decoder", LEVELS_800, 900, False, 7)]
  for r in results[:-1]:
    print(json.dumps(r))
  last = dict(results[-1])
  last["cases"] = results[:-1]
  print(json.dumps(last))


if __name__ == "__main__":
  main()
