"""The `mlp2x_gelu` projector and the image-token fusion of the two vision towers (docs/architecture.md B.1, B.5).

  MLP2xGELU:  Linear(in -> H) -> GELU (exact, erf) -> Linear(H -> H)
              used for `mm_projector` (in = CLIP width + last ConvNeXt width = 2560) and
              `mm_object_projector` (in = sum of ConvNeXt widths = 2880).
  fuse_image_tokens: CLIP patch tokens [B, T, Dc] ++ flattened last ConvNeXt map
              [B, Y, X, Dx] (row-major, Y*X == T) -> [B, T, Dc + Dx] (CLIP first).

Parameters: `fc1/{kernel,bias}`, `fc2/{kernel,bias}` (torch keys `{0,2}.{weight,bias}`, see
`chatrex_jax.convert.projector`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class MLP2xGELU(nn.Module):
  """[..., in] -> [..., features]."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def dense(name, axes):
      return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))
    x = dense("fc1", (None, "embed"))(x.astype(self.dtype))
    x = jax.nn.gelu(x, approximate=False)
    return dense("fc2", ("mlp", "embed"))(x)


def fuse_image_tokens(clip_tokens: jax.Array, convnext_last: jax.Array) -> jax.Array:
  """Concatenates CLIP tokens with the flattened last ConvNeXt map (RexSeek `encode_images`).

  clip_tokens: [B, T, Dc] (CLS already dropped), convnext_last: [B, Y, X, Dx] NHWC with
  Y * X == T. Returns [B, T, Dc + Dx] in the dtype of `clip_tokens`.
  """
  if clip_tokens.ndim != 3 or convnext_last.ndim != 4:
    raise ValueError(f"expected clip_tokens [B,T,D] and an NHWC map [B,Y,X,C], got "
                     f"{clip_tokens.shape} and {convnext_last.shape}")
  b, t, _ = clip_tokens.shape
  bb, y, x, c = convnext_last.shape
  if bb != b or y * x != t:
    raise ValueError(f"cannot fuse {t} CLIP tokens (batch {b}) with a {y}x{x} ConvNeXt map "
                     f"(batch {bb}): the map must have exactly one position per token. "
                     "At the ChatRex sizes CLIP 336/14 gives 24x24 and ConvNeXt 768/32 gives 24x24.")
  flat = convnext_last.reshape(b, t, c).astype(clip_tokens.dtype)
  return jnp.concatenate([clip_tokens, flat], axis=-1)
