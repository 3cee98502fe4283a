"""RoI-align with torchvision's exact semantics, as separable per-axis weight matrices.

`torchvision.ops.roi_align` (CPU kernel `roi_align_kernel.cpp`) samples, for every RoI and every
output bin (ph, pw), a grid of gh x gw points, bilinearly interpolates the map at each point and
averages. All of its rules factorise over the two axes:

* RoI in feature cells: start = X1 * spatial_scale - offset, end = X2 * spatial_scale - offset,
  offset = 0.5 if `aligned` else 0; length = end - start, and, only if not aligned,
  length = max(length, 1).
* bin = length / P; grid g = sampling_ratio if > 0 else ceil(length / P) (adaptive).
* sample k of bin p: y = start + p * bin + (k + 0.5) * bin / g (float32, this operation order).
* a sample with y < -1 or y > H (x < -1 or x > W) contributes 0; otherwise y = max(y, 0);
  if floor(y) >= H - 1 the last row is used with weight 1; else the usual (1 - ly, ly) pair.
  With the clamp this is the tent weight max(0, 1 - |min(max(y, 0), H - 1) - h|) on row h.
* the bin value is the sum of the samples / max(gh * gw, 1); gh <= 0 or gw <= 0 gives 0.

So `out[k, p, q, c] = sum_{h, w} Wy[k, p, h] * Wx[k, q, w] * F[b_k, h, w, c]` with
`Wy[k, p, h] = sum_i [i < gh] * valid(y_{p,i}) * tent(y_{p,i}, h) / gh` (and likewise Wx): two
small weight matrices per box (accumulated sample by sample: each adds its two corner weights
to its bin's row) and two einsums over the map, no gathers from the features. It is linear in
the features, so JAX differentiates it w.r.t. the features exactly like torch autograd; boxes
get no gradient (as in torchvision).

Static shapes. With a fixed `sampling_ratio > 0` the grid is static. With the adaptive grid
(`sampling_ratio <= 0`, torchvision's default -1) the per-box grid g is data dependent, so samples
are enumerated up to a static bound `max_sampling_grid` (G) and masked with `i < g`. The bound
defaults to `default_max_sampling_grid(size, output_size)` = ceil(2 * max(H, W) / P): exact for
every box whose side is at most twice the map side in feature cells (boxes inside the map need
only ceil(max(H, W) / P)). Boxes whose grid exceeds G follow `grid_overflow`:
* "clamp" (default): that axis is sampled with g = G (what torchvision computes with
  sampling_ratio=G on that axis): a uniform average over the bin, documented deviation;
* "nan": the RoI's output is NaN (jit-safe poison that cannot go unnoticed).
`check_sampling_grid` is the host-side (numpy) error check: it raises ValueError naming the boxes
that need a larger bound; run it in the data pipeline or before calling under `jit`.

Layouts: features are NHWC [B, H, W, C] (the project's layout; torchvision is NCHW). Boxes are
xyxy in the input-image frame (feature coords = box * spatial_scale), either padded per image
[B, O, 4] (-> [B, O, Ph, Pw, C]) or torchvision style [K, 5] rows (batch_index, x1, y1, x2, y2)
(-> [K, Ph, Pw, C]).
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Overflow = Literal["clamp", "nan"]
_OVERFLOW = ("clamp", "nan")


def _pair(v, what: str) -> tuple[int, int]:
  if isinstance(v, (int, np.integer)):
    v = (int(v), int(v))
  v = tuple(int(x) for x in v)
  if len(v) != 2 or min(v) < 1:
    raise ValueError(f"{what} must be a positive int or a pair of them, got {v}")
  return v


def default_max_sampling_grid(size: Sequence[int], output_size) -> int:
  """Static bound on the adaptive grid: ceil(2 * max(H, W) / min(Ph, Pw)) (>= 1)."""
  ph, pw = _pair(output_size, "output_size")
  return max(1, math.ceil(2 * max(size) / min(ph, pw)))


def _grid_size(length: jnp.ndarray, bins: int, sampling_ratio: int) -> jnp.ndarray:
  """torchvision's roi_bin_grid: sampling_ratio if > 0 else ceil(length / bins), int32."""
  if sampling_ratio > 0:
    return jnp.full(length.shape, sampling_ratio, jnp.int32)
  return jnp.ceil(length / jnp.float32(bins)).astype(jnp.int32)


def _roi_extent(lo, hi, spatial_scale: float, aligned: bool):
  """(start, length) of a RoI along one axis in feature cells, float32, torchvision's ops."""
  offset = jnp.float32(0.5 if aligned else 0.0)
  scale = jnp.float32(spatial_scale)
  start = lo.astype(jnp.float32) * scale - offset
  end = hi.astype(jnp.float32) * scale - offset
  length = end - start
  if not aligned:
    length = jnp.maximum(length, jnp.float32(1.0))
  return start, length


def axis_weights(lo: jnp.ndarray, hi: jnp.ndarray, size: int, bins: int, *,
                 spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
                 max_sampling_grid: int | None = None,
                 grid_overflow: Overflow = "clamp") -> tuple[jnp.ndarray, jnp.ndarray]:
  """Per-axis RoI-align weights (the separable factor of torchvision's bilinear sampling).

  lo, hi: [...] float, RoI start/end along this axis in input-image units (x1/x2 or y1/y2).
  size: static map extent along the axis (W or H); bins: output bins (Pw or Ph).
  returns: (weights [..., bins, size] float32, each row = mean over that bin's samples of the
    clamped bilinear tent weights, already divided by the grid size; overflow [...] bool, True
    where the adaptive grid exceeded `max_sampling_grid`).
  """
  if grid_overflow not in _OVERFLOW:
    raise ValueError(f"grid_overflow must be one of {_OVERFLOW}, got {grid_overflow!r}")
  start, length = _roi_extent(lo, hi, spatial_scale, aligned)
  bin_size = length / jnp.float32(bins)
  grid = _grid_size(length, bins, sampling_ratio)
  if sampling_ratio > 0:
    g_max = sampling_ratio
    overflow = jnp.zeros(grid.shape, bool)
  else:
    g_max = int(max_sampling_grid or default_max_sampling_grid((size,), bins))
    overflow = grid > g_max
    grid = jnp.minimum(grid, g_max)  # "clamp"; "nan" poisons the rows below
  # g <= 0 (aligned, empty or inverted RoI) samples nothing; divide by max(g, 1) so that no
  # NaN (0 / 0) is formed, the samples are masked anyway.
  grid_f = jnp.maximum(grid, 1).astype(jnp.float32)[..., None]    # [..., 1]
  p_bin = start[..., None] + jnp.arange(bins, dtype=jnp.float32) * bin_size[..., None]  # [..., P]
  rows = jnp.arange(size, dtype=jnp.int32)

  def add_sample(i, acc):
    """Adds sample i of every bin: two corner weights per bin row, [..., P, S]."""
    fi = i.astype(jnp.float32)
    # y = start + p * bin + (i + .5) * bin / g, in torchvision's operation order.
    y = p_bin + ((fi + jnp.float32(0.5)) * bin_size[..., None]) / grid_f     # [..., P]
    live = (i < grid[..., None]) & (y >= -1.0) & (y <= jnp.float32(size))
    # torchvision's corners: y <= 0 -> 0; floor(y) >= size - 1 -> last row with weight 1.
    yc = jnp.clip(y, 0.0, jnp.float32(size - 1))
    low = jnp.floor(yc).astype(jnp.int32)
    high = jnp.minimum(low + 1, size - 1)
    ly = yc - low.astype(jnp.float32)
    hy = 1.0 - ly
    s = jnp.where(live, 1.0, 0.0) / grid_f
    return (acc + jnp.where(rows == low[..., None], (hy * s)[..., None], 0.0)
            + jnp.where(rows == high[..., None], (ly * s)[..., None], 0.0))

  # A loop over the (static) grid bound, elementwise over boxes and bins: no [..., P, G, S]
  # tensor (XLA does not fuse that reduction on CPU) and no scatter (which the SPMD
  # partitioner replicates), so a batch-sharded call stays local to each device.
  weights = jax.lax.fori_loop(0, g_max, add_sample,
                              jnp.zeros((*start.shape, bins, size), jnp.float32))
  if grid_overflow == "nan" and sampling_ratio <= 0:
    weights = jnp.where(overflow[..., None, None], jnp.nan, weights)
  return weights, overflow


def _split_boxes(boxes: jnp.ndarray):
  return boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]


def roi_align(features: jnp.ndarray, boxes: jnp.ndarray, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False, *,
              max_sampling_grid: int | None = None, grid_overflow: Overflow = "clamp",
              precision=jax.lax.Precision.HIGHEST) -> jnp.ndarray:
  """torchvision.ops.roi_align on NHWC maps (jit-able, static shapes, fp32 sampling).

  features: [B, H, W, C] float (NHWC).
  boxes: [B, O, 4] xyxy per image (padded; padding rows just produce values to ignore), or
    torchvision style [K, 5] rows (batch_index, x1, y1, x2, y2); input-image frame,
    feature coords = box * spatial_scale.
  output_size: int or (Ph, Pw). sampling_ratio: > 0 fixed grid, <= 0 adaptive (torchvision -1).
  aligned: torchvision's `aligned` (half-pixel shift, no min-size clamp).
  max_sampling_grid / grid_overflow: static bound on the adaptive grid and what happens to boxes
    above it (module docstring).
  returns: [B, O, Ph, Pw, C] for [B, O, 4] boxes, [K, Ph, Pw, C] for [K, 5] rois, float32.
  """
  if features.ndim != 4:
    raise ValueError(f"features must be NHWC [B, H, W, C], got shape {features.shape}")
  ph, pw = _pair(output_size, "output_size")
  _, height, width, _ = features.shape
  if max_sampling_grid is None:
    max_sampling_grid = default_max_sampling_grid((height, width), (ph, pw))
  boxes = jax.lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
  torchvision_style = boxes.ndim == 2
  if torchvision_style:
    if boxes.shape[-1] != 5:
      raise ValueError(f"[K, 5] rois expected (batch_index, x1, y1, x2, y2), got {boxes.shape}")
    batch_index = boxes[:, 0].astype(jnp.int32)
    coords = boxes[:, 1:]
  elif boxes.ndim == 3:
    if boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
      raise ValueError(f"boxes must be [B={features.shape[0]}, O, 4] xyxy, got {boxes.shape}")
    coords = boxes
  else:
    raise ValueError(f"boxes must be [B, O, 4] or [K, 5], got shape {boxes.shape}")
  x1, y1, x2, y2 = _split_boxes(coords)
  kw = dict(spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned,
            max_sampling_grid=max_sampling_grid, grid_overflow=grid_overflow)
  wy, _ = axis_weights(y1, y2, height, ph, **kw)   # [..., Ph, H]
  wx, _ = axis_weights(x1, x2, width, pw, **kw)    # [..., Pw, W]
  features = features.astype(jnp.float32)
  if torchvision_style:
    onehot = jax.nn.one_hot(batch_index, features.shape[0], dtype=jnp.float32)   # [K, B]
    wyb = onehot[:, :, None, None] * wy[:, None]                                 # [K, B, Ph, H]
    t = jnp.einsum("kbph,bhwc->kpwc", wyb, features, precision=precision)
    return jnp.einsum("kpwc,kqw->kpqc", t, wx, precision=precision)
  t = jnp.einsum("boph,bhwc->bopwc", wy, features, precision=precision)
  return jnp.einsum("bopwc,boqw->bopqc", t, wx, precision=precision)


def required_sampling_grid(boxes, output_size, spatial_scale: float = 1.0,
                           aligned: bool = False) -> int:
  """Host-side: the largest adaptive grid any of `boxes` needs (numpy, float32 like torchvision).

  boxes: [..., 4] xyxy (or [K, 5] with a batch-index column, detected by the last axis).
  """
  b = np.asarray(boxes, np.float32)
  if b.shape[-1] == 5:
    b = b[..., 1:]
  if b.size == 0:
    return 0
  ph, pw = _pair(output_size, "output_size")
  off = np.float32(0.5 if aligned else 0.0)
  s = np.float32(spatial_scale)
  h = (b[..., 3] * s - off) - (b[..., 1] * s - off)
  w = (b[..., 2] * s - off) - (b[..., 0] * s - off)
  if not aligned:
    h, w = np.maximum(h, np.float32(1)), np.maximum(w, np.float32(1))
  gh = np.ceil(h / np.float32(ph))
  gw = np.ceil(w / np.float32(pw))
  return int(max(gh.max(), gw.max(), 0))


def check_sampling_grid(boxes, output_size, spatial_scale: float, max_sampling_grid: int,
                        aligned: bool = False) -> None:
  """Raises ValueError if any box needs an adaptive grid above `max_sampling_grid` (host-side)."""
  need = required_sampling_grid(boxes, output_size, spatial_scale, aligned)
  if need > max_sampling_grid:
    b = np.asarray(boxes, np.float32)
    flat = b.reshape(-1, b.shape[-1])
    bad = [i for i, row in enumerate(flat)
           if required_sampling_grid(row[None], output_size, spatial_scale, aligned)
           > max_sampling_grid]
    raise ValueError(
        f"{len(bad)} box(es) need an adaptive RoI-align grid of up to {need} samples per bin "
        f"axis, above max_sampling_grid={max_sampling_grid} (flat rows {bad[:10]}"
        f"{'...' if len(bad) > 10 else ''}); raise max_sampling_grid or clip the boxes")
