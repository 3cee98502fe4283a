"""Multi-scale deformable attention sampling (Deformable DETR's `ms_deform_attn_core`), pure JAX.

This is the parameter-free core that the CUDA kernel `MultiScaleDeformableAttention` and the
PyTorch fallback `ms_deform_attn_core_pytorch` compute: for every query, head, level and point,
bilinearly sample the value map at a normalised location with
`grid_sample(bilinear, padding_mode="zeros", align_corners=False)` semantics, weight the
samples by the attention weights and sum over levels and points.

Implementation: per (static) level the value map is flattened to [B*N, H_l*W_l, C]; the four
bilinear corners of every sampling location become flat indices, out-of-map corners get weight
0 (zero padding), and one `take_along_axis` gathers them. The corner weights, the validity mask
and the attention weight are multiplied into one weight per gathered row and reduced in the
same expression, so XLA fuses gather, multiply and sum. Only the levels are a Python loop.
Corner weights are computed from each corner's own offset (see `bilinear_gather`) so that XLA
recomputing a coordinate in two fusions cannot pair one floor's corners with another's weights.

Memory: XLA materialises the gathered rows per level ([B*N, Q*P*4, C] fp32); at encoder scale
(every token a query) that is more than PyTorch's grid_sample path (benchmarks/upn.py:
~1.8 GB vs ~1.3 GB for a 512x512 image). Gathering one corner at a time was measured to be
slower and larger (XLA keeps all four), so it is not done.

Everything runs in float32 (PyTorch disables autocast for this op). The function is
differentiable with respect to `value`, `sampling_locations` and `attention_weights`
(gradients of `floor` are zero, exactly as in grid_sample's backward).
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

SpatialShapes = Sequence[tuple[int, int]]


def level_start_index(spatial_shapes: SpatialShapes) -> tuple[int, ...]:
  """Prefix sums of H_l * W_l: where each level starts in the flattened token axis."""
  starts, s = [], 0
  for h, w in spatial_shapes:
    starts.append(s)
    s += int(h) * int(w)
  return tuple(starts)


def _check(value, spatial_shapes, sampling_locations, attention_weights):
  if value.ndim != 4:
    raise ValueError(f"value must be [B, S, N, C], got shape {value.shape}")
  if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
    raise ValueError("sampling_locations must be [B, Q, N, L, P, 2], got shape "
                     f"{sampling_locations.shape}")
  b, s, n, _ = value.shape
  _, q, n2, n_levels, p, _ = sampling_locations.shape
  if attention_weights.shape != (b, q, n, n_levels, p):
    raise ValueError(f"attention_weights shape {attention_weights.shape} != {(b, q, n, n_levels, p)}"
                     " (B, Q, N, L, P)")
  if n2 != n or sampling_locations.shape[0] != b:
    raise ValueError(f"batch/heads of sampling_locations {sampling_locations.shape[:3]} do not match "
                     f"value {value.shape}")
  if len(spatial_shapes) != n_levels:
    raise ValueError(f"{len(spatial_shapes)} spatial shapes for {n_levels} levels")
  total = sum(int(h) * int(w) for h, w in spatial_shapes)
  if total != s:
    raise ValueError(f"spatial shapes {list(spatial_shapes)} cover {total} tokens, value has {s}")


def bilinear_gather(value_l: jnp.ndarray, height: int, width: int, loc: jnp.ndarray,
                    weight: jnp.ndarray) -> jnp.ndarray:
  """Weighted bilinear samples of one level, summed over the points of each query.

  value_l: [G, H*W, C] float32 (G = batch * heads), row-major (y, x).
  loc: [G, Q, P, 2] float32 normalised (x, y), 0 = left/top edge, 1 = right/bottom edge.
  weight: [G, Q, P] float32 attention weights.
  returns: [G, Q, C] = sum_p weight * grid_sample(value_l, 2 * loc - 1).
  """
  g, q, p, _ = loc.shape
  # grid_sample's unnormalisation for align_corners=False: ((g + 1) * size - 1) / 2.
  grid = loc * 2 - 1
  x = ((grid[..., 0] + 1) * width - 1) / 2
  y = ((grid[..., 1] + 1) * height - 1) / 2
  # Far-away points sample nothing; clipping keeps the integer casts in range and changes no
  # value (all four corners are outside either way) and no gradient (both are zero there).
  x = jnp.clip(x, -2.0, width + 1.0)
  y = jnp.clip(y, -2.0, height + 1.0)
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  # Corner order: nw, ne, sw, se.
  cx = jnp.stack([x0, x0 + 1, x0, x0 + 1], axis=-1)
  cy = jnp.stack([y0, y0, y0 + 1, y0 + 1], axis=-1)
  # Weights from each corner's own offset: low corners 1 - (x - cx), high corners
  # 1 - (cx - x), clamped at 0. They equal the bilinear weights (x0 + 1 - x, x - x0), with the
  # same derivatives (-1 / +1, also at integer x), and stay right even if XLA evaluates `x` in
  # two fusions that differ by an ulp (FMA contraction): with weights taken from a separate
  # floor, a coordinate just below an integer in one copy and on it in the other moved a whole
  # unit of weight to the neighbouring column (seen in the full UPN jit).
  tx = 1.0 - jnp.asarray([1.0, -1.0, 1.0, -1.0], jnp.float32) * (x[..., None] - cx)
  ty = 1.0 - jnp.asarray([1.0, 1.0, -1.0, -1.0], jnp.float32) * (y[..., None] - cy)
  wx = jnp.where(tx >= 0, tx, 0.0)
  wy = jnp.where(ty >= 0, ty, 0.0)
  valid = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
  w = jnp.where(valid, wx * wy, 0.0) * weight[..., None]                # [G, Q, P, 4]
  ix = jnp.clip(cx, 0, width - 1).astype(jnp.int32)
  iy = jnp.clip(cy, 0, height - 1).astype(jnp.int32)
  flat = (iy * width + ix).reshape(g, q * p * 4, 1)
  rows = jnp.take_along_axis(value_l, flat, axis=1, mode="clip")         # [G, Q*P*4, C]
  rows = rows.reshape(g, q, p * 4, value_l.shape[-1])
  return jnp.sum(rows * w.reshape(g, q, p * 4, 1), axis=2)


def ms_deform_attn(value: jnp.ndarray, spatial_shapes: SpatialShapes,
                   sampling_locations: jnp.ndarray, attention_weights: jnp.ndarray) -> jnp.ndarray:
  """Multi-scale deformable attention core.

  value: [B, S, N, C] float, S = sum_l H_l * W_l (levels concatenated, each row-major).
  spatial_shapes: static ((H_0, W_0), ..., (H_{L-1}, W_{L-1})) Python ints.
  sampling_locations: [B, Q, N, L, P, 2] normalised (x, y) in the [0, 1] frame of each level.
  attention_weights: [B, Q, N, L, P] (softmaxed over L * P by the caller).
  returns: [B, Q, N * C] float32, heads concatenated head-major.
  """
  spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  _check(value, spatial_shapes, sampling_locations, attention_weights)
  b, s, n, c = value.shape
  q, n_levels, p = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
  value = value.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(b * n, s, c)
  loc = sampling_locations.astype(jnp.float32).transpose(0, 2, 3, 1, 4, 5).reshape(
      b * n, n_levels, q, p, 2)
  attn = attention_weights.astype(jnp.float32).transpose(0, 2, 3, 1, 4).reshape(
      b * n, n_levels, q, p)
  out = None
  for lvl, ((h, w), start) in enumerate(zip(spatial_shapes, level_start_index(spatial_shapes))):
    sampled = bilinear_gather(value[:, start:start + h * w], h, w, loc[:, lvl], attn[:, lvl])
    out = sampled if out is None else out + sampled
  return out.reshape(b, n, q, c).transpose(0, 2, 1, 3).reshape(b, q, n * c)
