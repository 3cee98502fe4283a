"""UPN's deformable transformer: encoder, two-stage query selection, decoder (docs/architecture.md A.6-A.8).

Shapes: B batch, S flattened tokens of all levels, L levels, Q queries, D model width.
Everything is batch-first (the official decoder is sequence-first; the maths is the same).
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from chatrex_jax.models.upn.deformable import MLP, MSDeformAttn, dense, layer_norm
from chatrex_jax.ops.full_attention import full_attention
from chatrex_jax.ops.position import sine_embed

SpatialShapes = Sequence[tuple[int, int]]


def exact_divide(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """IEEE a / b with broadcasting, as PyTorch computes it.

  XLA's algebraic simplifier rewrites `a / broadcast(b)` into `a * broadcast(1 / b)`, which can
  be 1 ulp off; UPN's anchor validity test (`0.01 < p < 0.99`) is a hard threshold that such an
  ulp flips (e.g. (49 + 0.5) / 50 gives 0.98999995 instead of 0.99). Broadcasting the divisor
  behind an optimisation barrier keeps a true element-wise division.
  """
  shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
  a = jnp.broadcast_to(a, shape)
  b = jax.lax.optimization_barrier(jnp.broadcast_to(b, shape))
  return a / b


def inverse_sigmoid(x: jnp.ndarray, eps: float = 1e-3) -> jnp.ndarray:
  """DETR's inverse_sigmoid: log(clamp(x, eps) / clamp(1 - x, eps)) after clamping x to [0, 1]."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1 - x, eps))


def encoder_reference_points(spatial_shapes: SpatialShapes, valid_ratios: jnp.ndarray) -> jnp.ndarray:
  """Token centres normalised by each image's valid region: [B, S, L, 2] (x, y).

  valid_ratios: [B, L, 2] (w, h). ref = (j + 0.5) / (vr_w * W_l), then times every level's ratio.
  """
  refs = []
  for lvl, (h, w) in enumerate(spatial_shapes):
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5,
                         indexing="ij")
    ry = exact_divide(jnp.asarray(ys.reshape(-1))[None], valid_ratios[:, None, lvl, 1] * h)
    rx = exact_divide(jnp.asarray(xs.reshape(-1))[None], valid_ratios[:, None, lvl, 0] * w)
    refs.append(jnp.stack([rx, ry], -1))
  ref = jnp.concatenate(refs, 1)
  return ref[:, :, None] * valid_ratios[:, None]


def encoder_output_proposals(memory: jnp.ndarray, padding_mask: jnp.ndarray,
                             spatial_shapes: SpatialShapes):
  """DINO's gen_encoder_output_proposals (docs/architecture.md A.7 step 1).

  memory [B, S, D], padding_mask [B, S] bool (True = padding).
  returns (output_memory [B, S, D] zeroed where padded/invalid,
           proposals [B, S, 4] unsigmoided cxcywh anchors, +inf where padded/invalid).
  """
  b = memory.shape[0]
  props, start = [], 0
  for lvl, (h, w) in enumerate(spatial_shapes):
    m = padding_mask[:, start:start + h * w].reshape(b, h, w)
    valid_h = jnp.sum(~m[:, :, 0], axis=1).astype(jnp.float32)
    valid_w = jnp.sum(~m[:, 0, :], axis=1).astype(jnp.float32)
    gy, gx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    grid = jnp.asarray(np.stack([gx, gy], -1))[None]                       # [1, H, W, 2]
    scale = jnp.stack([valid_w, valid_h], -1)[:, None, None, :]
    grid = exact_divide(grid + 0.5, scale)
    wh = jnp.full_like(grid, np.float32(0.05)) * np.float32(2.0 ** lvl)
    props.append(jnp.concatenate([grid, wh], -1).reshape(b, h * w, 4))
    start += h * w
  proposals = jnp.concatenate(props, 1)
  valid = jnp.all((proposals > 0.01) & (proposals < 0.99), axis=-1, keepdims=True)
  proposals = jnp.log(proposals / (1 - proposals))
  drop = padding_mask[..., None] | ~valid
  proposals = jnp.where(drop, jnp.inf, proposals)
  output_memory = jnp.where(drop, 0.0, memory)
  return output_memory, proposals


class EncoderLayer(nn.Module):
  """Post-norm deformable encoder layer: x = LN1(x + MSDA(x + pos)); x = LN2(x + FFN(x))."""
  d_model: int
  d_ffn: int
  n_heads: int
  n_levels: int
  n_points: int = 4

  @nn.compact
  def __call__(self, x, pos, ref, spatial_shapes, padding_mask):
    """x, pos [B, S, D]; ref [B, S, L, 2]; padding_mask [B, S] -> [B, S, D]."""
    b, s, d = x.shape
    attn = MSDeformAttn(self.d_model, self.n_levels, self.n_heads, self.n_points, name="self_attn")(
        x + pos, ref, x, spatial_shapes, padding_mask)
    # From the attention's output projection to norm2, all tokens of all images are one [B * S, D]
    # matrix, as the products see them. XLA:CPU fuses this whole span into one YNNPACK graph; with
    # B > 1 and [B, S, D] elementwise ops between 2-d products, that graph allocated its
    # [B * S, d_ffn] intermediates afresh in every layer (two 1.2 GB mmaps per layer at UPN-L's
    # batch 2, 5.4 M page faults and 9 s of system time per encoder run).
    x = layer_norm("norm1")(x.reshape(b * s, d) + attn.reshape(b * s, d))
    y = dense(self.d_model, "linear2", ("mlp", "embed"))(
        nn.relu(dense(self.d_ffn, "linear1", ("embed", "mlp"))(x)))
    x = layer_norm("norm2")(x + y).reshape(b, s, d)
    return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))


class QuerySelfAttention(nn.Module):
  """torch.nn.MultiheadAttention (q = k = x + pos, v = x), packed `in_proj` [D, 3D] like torch.

  x, pos: [B, Q, D] -> [B, Q, D]; no mask (UPN passes none).
  """
  d_model: int
  n_heads: int

  @nn.compact
  def __call__(self, x, pos):
    d, n = self.d_model, self.n_heads
    kernel = self.param("in_proj_kernel", nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(), ("embed", "mlp")), (d, 3 * d), jnp.float32)
    bias = self.param("in_proj_bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("mlp",)), (3 * d,), jnp.float32)
    kernel, bias = jnp.asarray(kernel), jnp.asarray(bias)
    qk_in = x + pos
    q = qk_in @ kernel[:, :d] + bias[:d]
    k = qk_in @ kernel[:, d:2 * d] + bias[d:2 * d]
    v = x @ kernel[:, 2 * d:] + bias[2 * d:]
    b, t, _ = x.shape
    q = q.reshape(b, t, n, d // n) * math.sqrt(1.0 / (d // n))
    k = k.reshape(b, t, n, d // n)
    v = v.reshape(b, t, n, d // n)
    out = full_attention(q, k, v).reshape(b, t, d)
    return dense(d, "out_proj", ("mlp", "embed"))(out)


class DecoderLayer(nn.Module):
  """UPN decoder layer: self-attn -> LN2, deformable cross-attn -> LN1, FFN -> LN3."""
  d_model: int
  d_ffn: int
  n_heads: int
  n_levels: int
  n_points: int = 4

  @nn.compact
  def __call__(self, tgt, query_pos, ref, memory, spatial_shapes, padding_mask):
    """tgt, query_pos [B, Q, D]; ref [B, Q, L, 4]; memory [B, S, D] -> [B, Q, D]."""
    t2 = QuerySelfAttention(self.d_model, self.n_heads, name="self_attn")(tgt, query_pos)
    tgt = layer_norm("norm2")(tgt + t2)
    t2 = MSDeformAttn(self.d_model, self.n_levels, self.n_heads, self.n_points, name="cross_attn")(
        tgt + query_pos, ref, memory, spatial_shapes, padding_mask)
    tgt = layer_norm("norm1")(tgt + t2)
    t2 = dense(self.d_model, "linear2", ("mlp", "embed"))(
        nn.relu(dense(self.d_ffn, "linear1", ("embed", "mlp"))(tgt)))
    return layer_norm("norm3")(tgt + t2)


class Encoder(nn.Module):
  """`num_layers` EncoderLayers (`layers_{i}`). src, pos [B, S, D] -> memory [B, S, D]."""
  num_layers: int
  d_model: int
  d_ffn: int
  n_heads: int
  n_levels: int
  n_points: int = 4

  @nn.compact
  def __call__(self, src, pos, spatial_shapes, valid_ratios, padding_mask):
    ref = encoder_reference_points(spatial_shapes, valid_ratios)
    x = src
    for i in range(self.num_layers):
      x = EncoderLayer(self.d_model, self.d_ffn, self.n_heads, self.n_levels, self.n_points,
                       name=f"layers_{i}")(x, pos, ref, spatial_shapes, padding_mask)
    return x


class Decoder(nn.Module):
  """Deformable decoder with iterative box refinement (docs/architecture.md A.8).

  `bbox_embed` is the shared box MLP, passed in (owned by the UPN module).
  Returns (hs [layers, B, Q, D] after the shared `norm`,
           references [layers + 1, B, Q, 4] sigmoid cxcywh; [0] = the initial reference).
  """
  num_layers: int
  d_model: int
  d_ffn: int
  n_heads: int
  n_levels: int
  n_points: int = 4

  @nn.compact
  def __call__(self, tgt, memory, refpoints_unsigmoid, spatial_shapes, valid_ratios, padding_mask,
               bbox_embed: nn.Module):
    d = self.d_model
    ref_point_head = MLP(d, d, 2, name="ref_point_head")
    ref_point_head_point = MLP(d, d, 2, name="ref_point_head_point")
    norm = layer_norm("norm")
    # The official code adds 0 * ref_point_head_point(zeros): numerically zero, parameters kept.
    zero_term = ref_point_head_point(jnp.zeros((1, 1, d), jnp.float32)) * 0.0
    ref = jax.nn.sigmoid(refpoints_unsigmoid)
    references, hs = [ref], []
    vr4 = jnp.concatenate([valid_ratios, valid_ratios], -1)[:, None]        # [B, 1, L, 4]
    for i in range(self.num_layers):
      ref_in = ref[:, :, None] * vr4                                       # [B, Q, L, 4]
      sine = sine_embed(ref_in[:, :, 0, (1, 0, 2, 3)], d // 2, 10000.0)   # (y, x, w, h)
      query_pos = ref_point_head(sine) + zero_term
      tgt = DecoderLayer(d, self.d_ffn, self.n_heads, self.n_levels, self.n_points,
                         name=f"layers_{i}")(tgt, query_pos, ref_in, memory, spatial_shapes, padding_mask)
      new_ref = jax.nn.sigmoid(bbox_embed(tgt) + inverse_sigmoid(ref))
      references.append(new_ref)
      ref = jax.lax.stop_gradient(new_ref)
      hs.append(norm(tgt))
    return jnp.stack(hs), jnp.stack(references)
