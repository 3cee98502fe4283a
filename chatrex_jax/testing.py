"""Helpers for equivalence tests and the golden fixtures (no pytest dependency)."""
from __future__ import annotations

import contextlib
import os
import pathlib

import numpy as np


def golden_root() -> pathlib.Path | None:
  """Locates `shared/golden`: $CHATREX_GOLDEN, else `../shared/golden` beside the checkout."""
  env = os.environ.get("CHATREX_GOLDEN")
  candidates = [pathlib.Path(env)] if env else []
  repo = pathlib.Path(__file__).resolve().parents[1]
  candidates += [repo.parent / "shared" / "golden", repo / "shared" / "golden"]
  for c in candidates:
    if (c / "README.md").exists():
      return c
  return None


def max_errors(got, want) -> tuple[float, float]:
  """(max abs error, max error relative to the reference's scale = max |want|)."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  if got.shape != want.shape:
    raise AssertionError(f"shape {got.shape} != reference shape {want.shape}")
  if want.size == 0:
    return 0.0, 0.0
  abs_err = float(np.max(np.abs(got - want)))
  scale = float(np.max(np.abs(want)))
  return abs_err, abs_err / max(scale, 1e-30)


def assert_close_to_scale(got, want, rel: float, what: str = "output") -> float:
  """Asserts max|got - want| <= rel * max|want| (DESIGN.md's 'of output scale')."""
  abs_err, rel_err = max_errors(got, want)
  if not rel_err <= rel:
    raise AssertionError(f"{what}: max abs {abs_err:.3g} = {rel_err:.3g} of scale > {rel:g}")
  return rel_err


@contextlib.contextmanager
def highest_precision():
  import jax
  with jax.default_matmul_precision("highest"):
    yield


def torch_to_numpy_state(module) -> dict[str, np.ndarray]:
  """A torch module's state dict as numpy arrays (detached copies)."""
  return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def torch_ms_deform_attn_core(value, shapes, loc, attn):
  """Deformable DETR's `ms_deform_attn_core_pytorch` (the UPN fallback), written with
  F.grid_sample: the PyTorch reference of `ops.ms_deform_attn` for tests and benchmarks.

  value [B, S, N, C], shapes [(H, W)] per level, loc [B, Q, N, L, P, 2] in [0, 1],
  attn [B, Q, N, L, P] (torch tensors) -> [B, Q, N * C].
  """
  import torch
  import torch.nn.functional as F
  b, _, n, c = value.shape
  _, q, _, nl, p, _ = loc.shape
  values = value.split([h * w for h, w in shapes], dim=1)
  grids = 2 * loc - 1
  samples = []
  for lvl, (h, w) in enumerate(shapes):
    v = values[lvl].flatten(2).transpose(1, 2).reshape(b * n, c, h, w)
    g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
    samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
  a = attn.transpose(1, 2).reshape(b * n, 1, q, nl * p)
  out = (torch.stack(samples, dim=-2).flatten(-2) * a).sum(-1).view(b, n * c, q)
  return out.transpose(1, 2).contiguous()
