"""Multi-scale deformable attention (UPN `MSDeformAttn`) and the small layers UPN shares.

Parameter names follow the official module (`sampling_offsets`, `attention_weights`,
`value_proj`, `output_proj`), so the converter is a plain Linear <-> Dense key map.
Every parameter carries logical axis names (see `chatrex_jax/models/__init__.py`).
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from chatrex_jax.models.layers import Projection
from chatrex_jax.ops.ms_deform_attn import ms_deform_attn

Dtype = jnp.dtype


def dense(features: int, name: str | None, axes: tuple[str, str] = ("embed", "mlp"), use_bias: bool = True,
          dtype: Dtype = jnp.float32, kernel_init=nn.initializers.xavier_uniform(),
          bias_init=nn.initializers.zeros_init()) -> Projection:
  """torch Linear as a [in, out] kernel (the torch weight transposed) and bias, with logical axis
  names. A `Projection`: one 2-d matmul over the merged leading axes, since XLA:CPU lowers a dot
  whose input keeps two non-contracting axes (batch > 1) as a slower generic dot (the UPN-L
  encoder FFN took 3.0 s at batch 2 against 0.99 s at batch 1 as nn.Dense)."""
  return Projection((features,), (axes[0],), (axes[1],), use_bias=use_bias, kernel_init=kernel_init,
                    bias_init=bias_init, dtype=dtype, name=name)


def layer_norm(name: str | None, eps: float = 1e-5) -> nn.LayerNorm:
  """torch.nn.LayerNorm semantics (two-pass variance, eps 1e-5), fp32 statistics."""
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=jnp.float32, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


class MLP(nn.Module):
  """DETR's MLP: `num_layers` Linear layers (`layers_{i}`), ReLU between them.

  x: [..., in] -> [..., output_dim].
  """
  hidden_dim: int
  output_dim: int
  num_layers: int
  zero_init_last: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      init = nn.initializers.zeros_init() if (last and self.zero_init_last) else nn.initializers.xavier_uniform()
      x = dense(self.output_dim if last else self.hidden_dim, f"layers_{i}", ("embed", "mlp") if i == 0
                else ("mlp", None) if not last else ("mlp", "embed"), dtype=self.dtype,
                kernel_init=init)(x)
      if not last:
        x = nn.relu(x)
    return x


def _offset_bias_init(n_heads: int, n_levels: int, n_points: int):
  """Deformable DETR's polar grid: head h points along angle 2*pi*h/N, scaled by point index+1."""
  def init(key, shape, dtype=jnp.float32):
    del key
    thetas = np.arange(n_heads, dtype=np.float32) * (2.0 * math.pi / n_heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, n_levels, n_points, 1))
    grid = grid * np.arange(1, n_points + 1, dtype=np.float32)[None, None, :, None]
    return jnp.asarray(grid.reshape(shape), dtype)
  return init


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention (Deformable DETR / UPN `MSDeformAttn`), fp32.

  Attributes: d_model D, n_levels L, n_heads N, n_points P; `use_4d_normalizer` selects
  loc = ref_xy + offset / (W_l, H_l) * ref_wh / 2 for box references (UPN uses False:
  loc = ref_xy + offset / P * ref_wh / 2).
  """
  d_model: int = 256
  n_levels: int = 4
  n_heads: int = 8
  n_points: int = 4
  use_4d_normalizer: bool = False

  @nn.compact
  def __call__(self, query: jnp.ndarray, reference_points: jnp.ndarray, value: jnp.ndarray,
               spatial_shapes: Sequence[tuple[int, int]], padding_mask: jnp.ndarray | None = None,
               return_aux: bool = False):
    """query [B, Q, D]; reference_points [B, Q, L, 2] (x, y) or [B, Q, L, 4] (cx, cy, w, h),
    normalised; value [B, S, D]; spatial_shapes static ((H_l, W_l), ...); padding_mask [B, S]
    bool (True = padding, its value rows are zeroed).

    returns: [B, Q, D] float32, and with `return_aux` also a dict with `sampling_locations`
      [B, Q, N, L, P, 2] and `attention_weights` [B, Q, N, L, P].
    """
    d, n, lv, p = self.d_model, self.n_heads, self.n_levels, self.n_points
    if d % n:
      raise ValueError(f"d_model {d} is not divisible by n_heads {n}")
    spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    if len(spatial_shapes) != lv:
      raise ValueError(f"MSDeformAttn has {lv} levels but got {len(spatial_shapes)} spatial shapes")
    if reference_points.shape[-1] not in (2, 4) or reference_points.shape[-2] != lv:
      raise ValueError(f"reference_points must be [B, Q, {lv}, 2 or 4], got {reference_points.shape}")
    b, q, _ = query.shape
    s = value.shape[1]
    query = query.astype(jnp.float32)
    v = dense(d, "value_proj")(value.astype(jnp.float32))
    if padding_mask is not None:
      v = jnp.where(padding_mask[..., None], 0.0, v)
    v = v.reshape(b, s, n, d // n)
    offsets = dense(n * lv * p * 2, "sampling_offsets", kernel_init=nn.initializers.zeros_init(),
                    bias_init=_offset_bias_init(n, lv, p))(query).reshape(b, q, n, lv, p, 2)
    logits = dense(n * lv * p, "attention_weights", kernel_init=nn.initializers.zeros_init())(query)
    weights = jax.nn.softmax(logits.reshape(b, q, n, lv * p), axis=-1).reshape(b, q, n, lv, p)
    ref = reference_points.astype(jnp.float32)[:, :, None, :, None, :]      # [B, Q, 1, L, 1, 2|4]
    normalizer = jnp.asarray([[w, h] for h, w in spatial_shapes], jnp.float32)[None, None, None, :, None, :]
    if reference_points.shape[-1] == 2:
      loc = ref + offsets / normalizer
    elif self.use_4d_normalizer:
      loc = ref[..., :2] + offsets / normalizer * ref[..., 2:] * 0.5
    else:
      loc = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5
    out = ms_deform_attn(v, spatial_shapes, loc, weights)
    out = dense(d, "output_proj", ("mlp", "embed"))(out)
    if return_aux:
      return out, {"sampling_locations": loc, "attention_weights": weights}
    return out
