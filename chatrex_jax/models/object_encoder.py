"""Object tokens: fused multi-level RoI features + sine box embedding (docs/architecture.md B.6).

The official `MultiLevelROIVisualPrompt` (RexSeek) bilinearly resizes ConvNeXt levels 1..3 to the
level-0 size (`F.interpolate`, align_corners=False), concatenates them on channels
([1, 2880, 192, 192] at the real size, ~425 MB), runs torchvision `roi_align(output_size=7,
spatial_scale=0.25, sampling_ratio=-1, aligned=False)` and averages the 7x7 bins.

Every step is linear and separable per axis, so nothing is materialised here:
* RoI-align followed by the 7x7 mean is, per box and axis, one weight vector over the level-0
  axis: a0[o, :] = mean over bins of `roi_align.axis_weights` ([O, S0]);
* bilinear upsampling of level k to level-0 size is a fixed matrix per axis U_k [S0, S_k]
  (`interpolate_matrix`, PyTorch's exact index arithmetic incl. the clamp of negative source
  coordinates to 0);
* so level k contributes out_k[o, c] = sum_{h, w} (a0y U_ky)[o, h] (a0x U_kx)[o, w] F_k[h, w, c],
  evaluated on the original-resolution map as GEMMs [O, rows W_k] @ [rows W_k, C_k] over
  blocks of rows (`block_bytes`), accumulated.
The result equals the official composition up to fp32 rounding (tests/test_object_encoder.py).

Position embedding (B.6.4): boxes / (S0 / spatial_scale) (768 at the real size; x by the width,
y by the height), converted to (cx, cy, w, h) with the official operation order, embedded with
`sine_embed(..., num_feats=pos_embedding_dim // 4, temperature=10000)` in the order
(cy, cx, w, h), and added.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from chatrex_jax.ops import position, roi_align


@functools.lru_cache(maxsize=64)
def interpolate_matrix(in_size: int, out_size: int) -> np.ndarray:
  """PyTorch `F.interpolate(mode="bilinear", align_corners=False)` along one axis as a matrix.

  Mirrors ATen's `area_pixel_compute_source_index` / `compute_source_index_and_lambda` in
  float32: src = max(in/out * (dst + 0.5) - 0.5, 0); i0 = min(floor(src), in - 1);
  i1 = i0 + (i0 < in - 1); l1 = clamp(src - i0, 0, 1); l0 = 1 - l1.
  returns: [out_size, in_size] float32 (read-only), rows sum to 1; resized = M @ x.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be >= 1, got in={in_size} out={out_size}")
  ratio = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = np.maximum(ratio * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
  i0 = np.minimum(src.astype(np.int64), in_size - 1)
  i1 = i0 + (i0 < in_size - 1)
  l1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
  l0 = np.float32(1) - l1
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), l0)
  np.add.at(m, (rows, i1), l1)
  m.setflags(write=False)
  return m


def box_position_embedding(boxes: jnp.ndarray, image_size: tuple[float, float],
                           num_feats: int) -> jnp.ndarray:
  """RexSeek's box embedding: xyxy pixels -> normalised (cx, cy, w, h) -> sine, y first.

  boxes: [..., 4] float xyxy in the (H_img, W_img) = image_size frame.
  returns: [..., 4 * num_feats] float32, blocks (cy, cx, w, h) of interleaved sin/cos.
  """
  img_h, img_w = image_size
  b = boxes.astype(jnp.float32)
  x1, x2 = b[..., 0] / jnp.float32(img_w), b[..., 2] / jnp.float32(img_w)
  y1, y2 = b[..., 1] / jnp.float32(img_h), b[..., 3] / jnp.float32(img_h)
  # Not ops.boxes.xyxy_to_cxcywh: the official in-place order gives cx = x1 + w / 2, which
  # rounds differently from (x1 + x2) / 2 in float32.
  w, h = x2 - x1, y2 - y1                 # official in-place order: w, h first,
  cx, cy = x1 + w / 2, y1 + h / 2         # then centres from the normalised corners
  return position.sine_embed(jnp.stack([cy, cx, w, h], axis=-1), num_feats, 10000.0)


class MultiLevelRoIEncoder(nn.Module):
  """2880-d object features from the 4 ConvNeXt maps without the upsampled concat (B.6).

  Attributes:
    output_size: RoI-align bins per axis (7).
    spatial_scale: level-0 cells per image pixel (192 / 768 = 0.25).
    add_pos_embedding: add the sine box embedding (official `add_pos_embedding`).
    sampling_ratio: torchvision's (-1 = adaptive, as the official call).
    max_sampling_grid: static bound on the adaptive grid (None: ceil(2 * S0 / output_size),
      exact for boxes up to twice the map side); see `chatrex_jax.ops.roi_align`.
    grid_overflow: "clamp" or "nan" for boxes above the bound (see `chatrex_jax.ops.roi_align`).
    precision: matmul precision of the weight compositions and GEMMs (fp32 RoI sampling).
    block_bytes: bytes of one image's map contracted per GEMM (row blocks, a sequential loop);
      None: one GEMM per level. Bounds the transient memory (weights + operand packing).
  """
  output_size: int = 7
  spatial_scale: float = 192 / 768
  add_pos_embedding: bool = True
  sampling_ratio: int = -1
  max_sampling_grid: int | None = None
  grid_overflow: str = "clamp"
  precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST
  block_bytes: int | None = 4 * 2**20

  def _pool_level(self, f: jnp.ndarray, wy: jnp.ndarray, wx: jnp.ndarray) -> jnp.ndarray:
    """sum_{h, w} wy[b, o, h] wx[b, o, w] f[b, h, w, c] -> [B, O, C], in row blocks.

    f: [B, H, W, C] float32; wy: [B, O, H]; wx: [B, O, W].
    Each block of rows is one GEMM [O, rows * W] @ [rows * W, C]; blocks of at most
    `block_bytes` of the map (per image) bound the weight matrix and the GEMM's operand packing
    (a single GEMM over the whole 192x192 level would pack the whole 27 MB map).
    """
    b, h, w, c = f.shape
    rows = h
    if self.block_bytes:
      fitting = [r for r in range(1, h + 1) if h % r == 0 and r * w * c * 4 <= self.block_bytes]
      rows = max(fitting, default=1)

    def block(start):
      f_blk = jax.lax.dynamic_slice_in_dim(f, start, rows, axis=1).reshape(b, rows * w, c)
      wy_blk = jax.lax.dynamic_slice_in_dim(wy, start, rows, axis=2)
      weights = (wy_blk[..., :, None] * wx[..., None, :]).reshape(b, -1, rows * w)
      return jnp.einsum("bon,bnc->boc", weights, f_blk, precision=self.precision)

    if rows == h:
      return block(0)
    return jax.lax.fori_loop(
        0, h // rows, lambda i, acc: acc + block(i * rows),
        jnp.zeros((b, wy.shape[1], c), jnp.float32))

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray], boxes: jnp.ndarray,
               mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Object features.

    features: L maps NHWC [B, H_k, W_k, C_k] (as the ConvNeXt tower returns them); level 0 is the
      largest (the size every level is resized to).
    boxes: [B, O, 4] float xyxy in image pixels (the 768-px frame at the real size), padded.
    mask: [B, O] bool, True for real boxes (None: all valid); other rows are zeroed.
    returns: [B, O, sum_k C_k] float32 (2880 at the real size), level blocks in input order.
    """
    features = list(features)
    if not features:
      raise ValueError("features: expected at least one level")
    for k, f in enumerate(features):
      if f.ndim != 4 or f.shape[0] != features[0].shape[0]:
        raise ValueError(f"features[{k}] must be NHWC [B, H, W, C] with the same B, got "
                         f"shapes {[tuple(x.shape) for x in features]}")
    batch, h0, w0, _ = features[0].shape
    if max(f.shape[1] for f in features) != h0 or max(f.shape[2] for f in features) != w0:
      raise ValueError("level 0 must be the largest map (all levels are resized to it), got "
                       f"{[tuple(f.shape[1:3]) for f in features]}")
    if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[-1] != 4:
      raise ValueError(f"boxes must be [B={batch}, O, 4] xyxy, got {boxes.shape}")
    channels = sum(f.shape[-1] for f in features)
    if self.add_pos_embedding and channels % 8:
      raise ValueError(f"the sine box embedding needs sum of channels ({channels}) divisible "
                       "by 8 (4 coordinates x an even number of features)")
    if mask is not None and mask.shape != boxes.shape[:2]:
      raise ValueError(f"mask must be [B, O] = {boxes.shape[:2]}, got {mask.shape}")

    boxes = boxes.astype(jnp.float32)
    kw = dict(spatial_scale=self.spatial_scale, sampling_ratio=self.sampling_ratio,
              aligned=False, grid_overflow=self.grid_overflow,
              max_sampling_grid=self.max_sampling_grid
              or roi_align.default_max_sampling_grid((h0, w0), self.output_size))
    # Mean over the bins of RoI-align's per-axis weights: [B, O, S0].
    ay, _ = roi_align.axis_weights(boxes[..., 1], boxes[..., 3], h0, self.output_size, **kw)
    ax, _ = roi_align.axis_weights(boxes[..., 0], boxes[..., 2], w0, self.output_size, **kw)
    ay = jnp.mean(ay, axis=-2)
    ax = jnp.mean(ax, axis=-2)

    outs = []
    for f in features:
      _, hk, wk, _ = f.shape
      wy = ay if hk == h0 else jnp.einsum("boh,hk->bok", ay, interpolate_matrix(hk, h0),
                                          precision=self.precision)
      wx = ax if wk == w0 else jnp.einsum("bow,wk->bok", ax, interpolate_matrix(wk, w0),
                                          precision=self.precision)
      outs.append(self._pool_level(f.astype(jnp.float32), wy, wx))
    out = jnp.concatenate(outs, axis=-1)

    if self.add_pos_embedding:
      image_size = (h0 / self.spatial_scale, w0 / self.spatial_scale)
      out = out + box_position_embedding(boxes, image_size, channels // 4)
    if mask is not None:
      out = jnp.where(mask[..., None], out, 0.0)
    return nn.with_logical_constraint(out, ("activation_batch", None, None))
