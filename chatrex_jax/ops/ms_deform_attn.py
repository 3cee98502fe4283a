"""Multi-scale deformable attention sampling (Deformable DETR's `ms_deform_attn_core`), pure JAX.

This is the parameter-free core that the CUDA kernel `MultiScaleDeformableAttention` and the
PyTorch fallback `ms_deform_attn_core_pytorch` compute: for every query, head, level and point,
bilinearly sample the value map at a normalised location with
`grid_sample(bilinear, padding_mode="zeros", align_corners=False)` semantics, weight the
samples by the attention weights and sum over levels and points.

Axes: B batch, S value tokens (all levels), N heads, C channels per head, G = B * N,
Q queries, L levels, P points per level.

Both paths lay each level's value map out head-major and channels-last with a zero border
(`pad_levels`: [G, H + 3, W + 3, C]; one pixel before, two after). The border is grid_sample's
zero padding, so no corner needs a validity mask, and the four bilinear corners of a sample are
two runs of 2C floats (a 2 x 2 x C window).

Many queries (the encoder: every token is one) take the blocked path, `_sample_in_blocks`:
- All levels of all images are one flat [G * R, C] map, so one gather per block fetches every
  sample's window as two 2-pixel rows, whatever its image, head or level.
- The queries of all images run in blocks of `DEFAULT_QUERY_CHUNK` (a `lax.scan`). A block's
  windows ([48 queries, N, L * P * 2, 2, C], 4 MB at UPN-L) stay in cache between the gather
  and the weighted sum that reads them. Blocks of 1024 queries wrote 84 MB per block through
  memory: at the UPN-L encoder size (800 x 1129, 75,484 queries, encoder-like locations) one
  call took 1.14-1.17 s, now 0.74-0.76 s (the two alternating in one process).
- The pixel coordinates are computed once and enter the scan as inputs, so they are stored
  values. Each step floors its block's coordinates into gather rows and corner weights for the
  next step (the carry). Two things follow: the gather and the weights floor the same stored
  float, so they always agree on the window (a coordinate recomputed in two fusions can round
  across an integer and move a whole unit of weight to the neighbouring pixel), and XLA cannot
  fuse the index and weight arithmetic into the gather and the sum, where it would run once
  per channel instead of once per sample.
- The backward recomputes each block's windows (`jax.checkpoint`) instead of keeping them: at
  the UPN-L encoder size the windows of all blocks are 6.2 GB. Forward + backward there took
  5.2-5.5 s with a 7.8 GB peak in 1024-query blocks that kept them, now 3.7-4.0 s and 1.4 GB.

Few queries (the decoder's 900) take one pass, `bilinear_windows` per level: building the flat
map copies the whole value (77 MB at UPN-L), and the blocked path took 61-68 ms for the decoder
against 34 ms in one pass, where XLA fuses the bordered layout into the gathers. The floor that
places the window goes through an optimisation barrier for backends that keep it before fusion
(XLA:CPU drops it; the gather and weight fusions there compute the same floor with the same
operations).

Everything runs in float32 (PyTorch disables autocast for this op). The function is
differentiable with respect to `value`, `sampling_locations` and `attention_weights`
(gradients of `floor` are zero, exactly as in grid_sample's backward).
"""
from __future__ import annotations

from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

SpatialShapes = Sequence[tuple[int, int]]

# Queries per block of the blocked path. At the UPN-L encoder size (75,484 queries), forward:
# 32 -> 0.77 s, 48 -> 0.76 s, 64 -> 0.83 s, 1024 (the windows through memory) -> 1.16 s.
DEFAULT_QUERY_CHUNK = 48
# Up to this many queries per image, one pass (no flat copy of the value maps).
SINGLE_PASS_QUERIES = 1024

# The window gather of one pass: operand [G, H+3, W+3, C], starts [G, K, 2] (y, x) -> [G, K, 2, 2, C].
_WINDOW = lax.GatherDimensionNumbers(offset_dims=(2, 3, 4), collapsed_slice_dims=(),
                                     start_index_map=(1, 2), operand_batching_dims=(0,),
                                     start_indices_batching_dims=(0,))
# The row gather of the blocked path: operand [G * R, C], rows [k, N, J, 1] -> [k, N, J, 2, C].
_ROWS = lax.GatherDimensionNumbers(offset_dims=(3, 4), collapsed_slice_dims=(), start_index_map=(0,))


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


def pad_levels(value: jnp.ndarray, spatial_shapes: SpatialShapes) -> list[jnp.ndarray]:
  """[B, S, N, C] -> per level [G, H + 3, W + 3, C]: head-major maps with a zero border of one
  pixel before and two after (a window starting at the last clipped coordinate stays inside)."""
  b, s, n, c = value.shape
  value = value.transpose(0, 2, 1, 3).reshape(b * n, s, c)
  return [jnp.pad(value[:, start:start + h * w].reshape(b * n, h, w, c),
                  ((0, 0), (1, 2), (1, 2), (0, 0)))
          for (h, w), start in zip(spatial_shapes, level_start_index(spatial_shapes))]


def pixel_coordinates(loc: jnp.ndarray, height, width) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Normalised (x, y) [..., 2] -> grid_sample's pixel coordinates x, y [...], clipped to
  [-1, size]. height / width: Python numbers, or arrays that broadcast against loc[..., 0].

  The unnormalisation for align_corners=False is ((g + 1) * size - 1) / 2 with g = 2 loc - 1.
  A sample left of -1 or right of `size` has both corners in the border: clipping there changes
  no value (zero) and no gradient (zero in grid_sample too). `where` keeps the gradient at
  exactly -1, where corner 0 is inside the map.
  """
  grid = loc * 2 - 1
  x = ((grid[..., 0] + 1) * width - 1) / 2
  y = ((grid[..., 1] + 1) * height - 1) / 2
  x = jnp.where(x < -1.0, -1.0, jnp.where(x > width, width, x))
  y = jnp.where(y < -1.0, -1.0, jnp.where(y > height, height, y))
  return x, y


def bilinear_windows(padded: jnp.ndarray, height: int, width: int, loc: jnp.ndarray,
                     weight: jnp.ndarray) -> jnp.ndarray:
  """Weighted bilinear samples of one level, summed over the points of each query (one pass).

  padded: [G, H+3, W+3, C] float32 from `pad_levels`.
  loc: [G, Q, P, 2] float32 normalised (x, y), 0 = left/top edge, 1 = right/bottom edge.
  weight: [G, Q, P] float32 attention weights.
  returns: [G, Q, C] = sum_p weight * grid_sample(map, 2 * loc - 1).
  """
  g, q, p, _ = loc.shape
  x, y = pixel_coordinates(loc, height, width)
  x0, y0 = lax.optimization_barrier((jnp.floor(x), jnp.floor(y)))
  # Tent weights of the window's corners (columns x0, x0 + 1; rows y0, y0 + 1). `where`, not
  # `maximum`: on a pixel centre a weight is exactly 0 and must keep grid_sample's one-sided
  # derivative (1), where `maximum` would split a tie's gradient in half.
  tent = lambda t: jnp.where(t >= 0, t, 0.0)
  wx0 = tent(1.0 - (x - x0))
  wx1 = tent(1.0 - (x0 + 1.0 - x))
  wy0 = tent(1.0 - (y - y0)) * weight
  wy1 = tent(1.0 - (y0 + 1.0 - y)) * weight
  corner_weights = jnp.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], axis=-1)  # [G, Q, P, 4]
  # Border offset +1: map pixel (y0, x0) is padded pixel (y0 + 1, x0 + 1).
  starts = jnp.stack([y0 + 1, x0 + 1], axis=-1).astype(jnp.int32).reshape(g, q * p, 2)
  windows = lax.gather(padded, starts, _WINDOW, slice_sizes=(1, 2, 2, padded.shape[-1]),
                       mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)        # [G, Q*P, 2, 2, C]
  # A batched product (P: the points' 4 corners each), not a multiply-reduce: with the latter
  # XLA fuses the bordered layout, the gather and the reduce into one loop, which ran slower than
  # PyTorch; this way the gather stays a fusion of its own, 1.8x faster (decoder forward 37
  # against 65-69 ms, one run).
  return jnp.einsum("GQP,GQPC->GQC", corner_weights.reshape(g, q, p * 4),
                    windows.reshape(g, q, p * 4, padded.shape[-1]))


def _sample_in_blocks(value: jnp.ndarray, spatial_shapes: SpatialShapes, loc: jnp.ndarray,
                      attn: jnp.ndarray, query_chunk: int) -> jnp.ndarray:
  """The blocked path (module docstring). value [B, S, N, C], loc [B, Q, N, L, P, 2],
  attn [B, Q, N, L, P], all float32 -> [B, Q, N * C]."""
  b, _, n, c = value.shape
  q, n_levels, p = loc.shape[1], loc.shape[3], loc.shape[4]
  maps = [level.reshape(b * n, -1, c) for level in pad_levels(value, spatial_shapes)]
  rows_per_map = sum(m.shape[1] for m in maps)
  flat = jnp.concatenate(maps, axis=1).reshape(b * n * rows_per_map, c)   # [G * R, C]

  heights = np.asarray([[h] for h, _ in spatial_shapes], np.float32)    # [L, 1]: broadcast over P
  widths = np.asarray([[w] for _, w in spatial_shapes], np.float32)
  stride = np.asarray([[w + 3] for _, w in spatial_shapes], np.int32)   # rows per padded map row
  level_offset = np.cumsum([0] + [(h + 3) * (w + 3) for h, w in spatial_shapes])[:-1, None]
  # Flat row of padded pixel (1, 1), i.e. map pixel (0, 0), per head and level: [N, L, 1].
  origin = (np.arange(n)[:, None, None] * rows_per_map + level_offset + stride + 1).astype(np.int32)

  x, y = pixel_coordinates(loc, heights, widths)    # [B, Q, N, L, P] each

  # Every image's queries in one axis, in blocks of `size`, plus one block of padding: step i
  # samples block i - 1 (carried) and prepares block i, so the first step's output is dropped.
  total = b * q
  blocks = -(-total // query_chunk)
  size = -(-total // blocks)
  pad = (blocks + 1) * size - total   # padded queries: image 0's pixel (0, 0), weight 0
  def split(t):  # [B, Q, N, L, P] -> [blocks + 1, size, N, L, P]
    t = jnp.pad(t.reshape(total, n, n_levels, p), ((0, pad), (0, 0), (0, 0), (0, 0)))
    return t.reshape(blocks + 1, size, n, n_levels, p)
  image_origin = jnp.pad(jnp.repeat(jnp.arange(b, dtype=jnp.int32) * (n * rows_per_map), q),
                         (0, pad)).reshape(blocks + 1, size)
  samples = n_levels * p

  def corners(x, y, a, image_origin):  # [k, N, L, P] x3, [k] -> rows [k, N, LP2], weights [k, N, LP4]
    x0, y0 = jnp.floor(x), jnp.floor(y)
    top = (image_origin[:, None, None, None] + origin + y0.astype(jnp.int32) * stride
           + x0.astype(jnp.int32))
    rows = top[..., None] + stride[:, :, None] * np.arange(2, dtype=np.int32)  # window rows y0, y0+1
    fx, fy = x - x0, y - y0
    wx = jnp.stack([1.0 - fx, fx], -1)
    wy = jnp.stack([(1.0 - fy) * a, fy * a], -1)
    weights = wy[..., :, None] * wx[..., None, :]                              # [k, N, L, P, 2, 2]
    return rows.reshape(size, n, samples * 2), weights.reshape(size, n, samples * 4)

  @jax.checkpoint
  def sample(rows, weights):  # -> [size * N, C]
    windows = lax.gather(flat, rows[..., None], _ROWS, slice_sizes=(2, c),
                         mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)       # [size, N, LP2, 2, C]
    # Three axes: YNNPACK's reduce ran 30x slower with a leading axis of size 1.
    return jnp.sum(windows.reshape(size * n, samples * 4, c)
                   * weights.reshape(size * n, samples * 4, 1), axis=1)

  def step(carry, block):
    return corners(*block), sample(*carry)

  start = (jnp.zeros((size, n, samples * 2), jnp.int32), jnp.zeros((size, n, samples * 4), jnp.float32))
  _, out = lax.scan(step, start, (split(x), split(y), split(attn), image_origin))
  return out[1:].reshape(blocks * size, n * c)[:total].reshape(b, q, n * c)


def ms_deform_attn(value: jnp.ndarray, spatial_shapes: SpatialShapes,
                   sampling_locations: jnp.ndarray, attention_weights: jnp.ndarray,
                   query_chunk: int | None = None) -> jnp.ndarray:
  """Multi-scale deformable attention core.

  value: [B, S, N, C] float, S = sum_l H_l * W_l (levels concatenated, each row-major).
  spatial_shapes: static ((H_0, W_0), ..., (H_{L-1}, W_{L-1})) Python ints.
  sampling_locations: [B, Q, N, L, P, 2] normalised (x, y) in the [0, 1] frame of each level.
  attention_weights: [B, Q, N, L, P] (softmaxed over L * P by the caller).
  query_chunk: None chooses: one pass up to `SINGLE_PASS_QUERIES` queries per image, else blocks
    of `DEFAULT_QUERY_CHUNK`. A number forces blocks of that many queries.
  returns: [B, Q, N * C] float32, heads concatenated head-major.
  """
  spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  _check(value, spatial_shapes, sampling_locations, attention_weights)
  if query_chunk is not None and query_chunk < 1:
    raise ValueError(f"query_chunk must be a positive number of queries or None, got {query_chunk}")
  value = value.astype(jnp.float32)
  sampling_locations = sampling_locations.astype(jnp.float32)
  attention_weights = attention_weights.astype(jnp.float32)
  b, _, n, c = value.shape
  q, n_levels, p = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
  if query_chunk is None and q > SINGLE_PASS_QUERIES:
    query_chunk = DEFAULT_QUERY_CHUNK
  if query_chunk is not None:
    return _sample_in_blocks(value, spatial_shapes, sampling_locations, attention_weights,
                             query_chunk)

  padded = pad_levels(value, spatial_shapes)
  loc = sampling_locations.transpose(0, 2, 3, 1, 4, 5).reshape(b * n, n_levels, q, p, 2)
  attn = attention_weights.transpose(0, 2, 3, 1, 4).reshape(b * n, n_levels, q, p)
  out = None
  for lvl, (h, w) in enumerate(spatial_shapes):
    sampled = bilinear_windows(padded[lvl], h, w, loc[:, lvl], attn[:, lvl])
    out = sampled if out is None else out + sampled
  return out.reshape(b, n, q, c).transpose(0, 2, 1, 3).reshape(b, q, n * c)
