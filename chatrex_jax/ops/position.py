"""Sine position embeddings, one parameterised family for UPN and the object encoder.

All share the DETR/DINO construction: a value v (already scaled, typically by 2*pi) is divided
by dim_t[k] = temperature ** (2 * floor(k / 2) / num_feats) and the features are interleaved
[sin(v/dim_t[0]), cos(v/dim_t[1]), sin(v/dim_t[2]), ...] (pairs share one frequency).

Users:
* UPN decoder queries: `sine_embed(boxes[..., (1, 0, 2, 3)], 128, 10000)`, order (y, x, w, h).
* ChatRex object tokens: `sine_embed(cxcywh[..., (1, 0, 2, 3)], 720, 10000)`, order
  (cy, cx, w, h), 2880 features.
* UPN feature maps: `sine_position_map(mask, 128, temperature=20)`, y first (A.3).
"""
from __future__ import annotations

import math

import jax.numpy as jnp


def frequencies(num_feats: int, temperature: float) -> jnp.ndarray:
  """dim_t: [num_feats] float32, as PyTorch computes it (float pow of integer exponents)."""
  k = jnp.arange(num_feats, dtype=jnp.float32)
  return jnp.asarray(temperature, jnp.float32) ** (2 * jnp.floor(k / 2) / num_feats)


def interleave_sin_cos(v: jnp.ndarray, num_feats: int, temperature: float) -> jnp.ndarray:
  """[...] values -> [..., num_feats] interleaved sin/cos features (no scaling of v)."""
  p = v[..., None].astype(jnp.float32) / frequencies(num_feats, temperature)
  return jnp.stack([jnp.sin(p[..., 0::2]), jnp.cos(p[..., 1::2])], axis=-1).reshape(
      *p.shape[:-1], num_feats)


def sine_embed(coords: jnp.ndarray, num_feats: int, temperature: float = 10000.0,
               scale: float = 2 * math.pi) -> jnp.ndarray:
  """Embeds each coordinate of the last axis, concatenated in the given order.

  coords: [..., K] float (normalised, e.g. a box in [0, 1]); reorder before calling, e.g.
    `boxes[..., (1, 0, 2, 3)]` for the y-first (y, x, w, h) layout.
  returns: [..., K * num_feats] float32.
  """
  feats = interleave_sin_cos(coords * scale, num_feats, temperature)
  return feats.reshape(*coords.shape[:-1], coords.shape[-1] * num_feats)


def sine_position_map(mask: jnp.ndarray, num_feats: int = 128, temperature: float = 20.0,
                      normalize: bool = True, scale: float = 2 * math.pi,
                      eps: float = 1e-6) -> jnp.ndarray:
  """DETR's `PositionEmbeddingSine(HW)` over a padded feature map (UPN A.3).

  mask: [B, H, W] bool, True on padding.
  returns: [B, H, W, 2 * num_feats] float32, channels (pos_y, pos_x): y first.
  """
  not_mask = (~mask).astype(jnp.float32)
  y = jnp.cumsum(not_mask, axis=1)
  x = jnp.cumsum(not_mask, axis=2)
  if normalize:
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
  return jnp.concatenate([interleave_sin_cos(y, num_feats, temperature),
                          interleave_sin_cos(x, num_feats, temperature)], axis=-1)
