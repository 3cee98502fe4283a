"""Multi-scale deformable attention sampling (Deformable DETR's `ms_deform_attn_core`), pure JAX.

This is the parameter-free core that the CUDA kernel `MultiScaleDeformableAttention` and the
PyTorch fallback `ms_deform_attn_core_pytorch` compute: for every query, head, level and point,
bilinearly sample the value map at a normalised location with
`grid_sample(bilinear, padding_mode="zeros", align_corners=False)` semantics, weight the
samples by the attention weights and sum over levels and points.

Axes: B batch, S value tokens (all levels), N heads, C channels per head, G = B * N,
Q queries, L levels, P points per level.

Implementation:
- Each level's value map is laid out head-major and channels-last, with a zero border
  (`pad_levels`: [G, H + 3, W + 3, C]; one pixel before, two after; XLA fuses this into the
  gathers when there is a single query block, and copies once otherwise). The border is
  grid_sample's zero padding, so no corner needs a validity mask, and the four bilinear
  corners of a sample are one 2 x 2 x C window that a single gather index addresses (two
  contiguous runs of 2C floats instead of four scattered rows).
- The corner weights are the tent function of each corner's distance to the sample point, and
  the floor that places the window goes through an optimisation barrier, so that the gather
  and the weights use the same floor even if XLA recomputes the coordinate in two fusions
  (an FMA-contracted copy that rounds across an integer otherwise moves a whole unit of
  weight to the neighbouring pixel: seen in the full UPN jit).
- Queries are processed in blocks of `query_chunk` (a `lax.map`), so the gathered windows of
  one block ([G, chunk * P, 2, 2, C] per level) are all that is ever materialised. Without
  blocks, the encoder (every token a query) gathered 6.2 GB at 800 x 1129; with 1024-query
  blocks the op's peak is the inputs plus a few tens of MB (`benchmarks/upn.py`: 0.33-0.40 GB
  in all, against PyTorch's 4.5 GB).
- The weighted corners are summed by a multiply-reduce in query blocks and by a batched product
  when all queries are one block (the decoder): there XLA would otherwise fuse the bordered
  layout, the gather and the reduce into one slow loop.

Everything runs in float32 (PyTorch disables autocast for this op). The function is
differentiable with respect to `value`, `sampling_locations` and `attention_weights`
(gradients of `floor` are zero, exactly as in grid_sample's backward).
"""
from __future__ import annotations

from typing import Sequence

from jax import lax
import jax.numpy as jnp

SpatialShapes = Sequence[tuple[int, int]]

# Queries per block: 512-4096 measured within 15% of each other at the UPN-L encoder size.
DEFAULT_QUERY_CHUNK = 1024

# The window gather: operand [G, H+3, W+3, C], starts [G, K, 2] (y, x) -> [G, K, 2, 2, C].
_WINDOW = lax.GatherDimensionNumbers(offset_dims=(2, 3, 4), collapsed_slice_dims=(),
                                     start_index_map=(1, 2), operand_batching_dims=(0,),
                                     start_indices_batching_dims=(0,))


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


def bilinear_windows(padded: jnp.ndarray, height: int, width: int, loc: jnp.ndarray,
                     weight: jnp.ndarray, weigh_by_product: bool = False) -> jnp.ndarray:
  """Weighted bilinear samples of one level, summed over the points of each query.

  padded: [G, H+3, W+3, C] float32 from `pad_levels`.
  loc: [G, Q, P, 2] float32 normalised (x, y), 0 = left/top edge, 1 = right/bottom edge.
  weight: [G, Q, P] float32 attention weights.
  weigh_by_product: sum the weighted corners as a batched product instead of a multiply-reduce
    (the same sums; which is faster depends on how XLA fuses the gather, see `ms_deform_attn`).
  returns: [G, Q, C] = sum_p weight * grid_sample(map, 2 * loc - 1).
  """
  g, q, p, _ = loc.shape
  # grid_sample's unnormalisation for align_corners=False: ((g + 1) * size - 1) / 2.
  grid = loc * 2 - 1
  x = ((grid[..., 0] + 1) * width - 1) / 2
  y = ((grid[..., 1] + 1) * height - 1) / 2
  # A sample left of -1 or right of `width` has both corners in the border: clipping there
  # changes no value (zero) and no gradient (zero in grid_sample too). `where` keeps the
  # gradient at exactly -1, where corner 0 is inside the map.
  x = jnp.where(x < -1.0, -1.0, jnp.where(x > width, float(width), x))
  y = jnp.where(y < -1.0, -1.0, jnp.where(y > height, float(height), y))
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
  windows = windows.reshape(g, q, p * 4, padded.shape[-1])
  if weigh_by_product:   # P: the points' 4 corners each
    return jnp.einsum("GQP,GQPC->GQC", corner_weights.reshape(g, q, p * 4), windows)
  return jnp.sum(windows * corner_weights.reshape(g, q, p * 4, 1), axis=2)


def ms_deform_attn(value: jnp.ndarray, spatial_shapes: SpatialShapes,
                   sampling_locations: jnp.ndarray, attention_weights: jnp.ndarray,
                   query_chunk: int | None = DEFAULT_QUERY_CHUNK) -> jnp.ndarray:
  """Multi-scale deformable attention core.

  value: [B, S, N, C] float, S = sum_l H_l * W_l (levels concatenated, each row-major).
  spatial_shapes: static ((H_0, W_0), ..., (H_{L-1}, W_{L-1})) Python ints.
  sampling_locations: [B, Q, N, L, P, 2] normalised (x, y) in the [0, 1] frame of each level.
  attention_weights: [B, Q, N, L, P] (softmaxed over L * P by the caller).
  query_chunk: queries per block (None: one block).
  returns: [B, Q, N * C] float32, heads concatenated head-major.
  """
  spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  _check(value, spatial_shapes, sampling_locations, attention_weights)
  if query_chunk is not None and query_chunk < 1:
    raise ValueError(f"query_chunk must be a positive number of queries or None, got {query_chunk}")
  b, _, n, c = value.shape
  q, n_levels, p = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
  padded = pad_levels(value.astype(jnp.float32), spatial_shapes)
  loc = sampling_locations.astype(jnp.float32).transpose(0, 2, 3, 1, 4, 5).reshape(
      b * n, n_levels, q, p, 2)
  attn = attention_weights.astype(jnp.float32).transpose(0, 2, 3, 1, 4).reshape(
      b * n, n_levels, q, p)

  # One block (the decoder's 900 queries): XLA fuses the bordered layout, the gather and a
  # multiply-reduce into one loop, which ran slower than PyTorch; as a batched product the gather
  # stays a fusion of its own, 1.8x faster (decoder forward 37 against 65-69 ms, one run). In
  # query blocks (the encoder) the multiply-reduce is faster (1.52 against 1.88 s).
  single_block = query_chunk is None or q <= query_chunk

  def block(loc, attn):  # [G, L, q, P, 2], [G, L, q, P] -> [G, q, C]
    out = None
    for lvl, (h, w) in enumerate(spatial_shapes):
      sampled = bilinear_windows(padded[lvl], h, w, loc[:, lvl], attn[:, lvl], single_block)
      out = sampled if out is None else out + sampled
    return out

  if single_block:
    out = block(loc, attn)
  else:
    # Equal blocks of at most query_chunk: fewer than `blocks` padded queries in all.
    blocks = -(-q // query_chunk)
    size = -(-q // blocks)
    pad = blocks * size - q   # padded queries sample (0, 0) with weight 0; dropped below
    loc = jnp.pad(loc, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0)))
    attn = jnp.pad(attn, ((0, 0), (0, 0), (0, pad), (0, 0)))
    loc = jnp.moveaxis(loc.reshape(b * n, n_levels, blocks, size, p, 2), 2, 0)
    attn = jnp.moveaxis(attn.reshape(b * n, n_levels, blocks, size, p), 2, 0)
    out = lax.map(lambda xs: block(*xs), (loc, attn))                      # [blocks, G, size, C]
    out = jnp.moveaxis(out, 0, 1).reshape(b * n, blocks * size, c)[:, :q]
  return out.reshape(b, n, q, c).transpose(0, 2, 1, 3).reshape(b, q, n * c)
