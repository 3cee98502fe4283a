"""Swin Transformer backbone as used by UPN (the detection variant of Swin, NHWC inside).

Matches `SwinTransformer` of Swin-Transformer-Object-Detection / DINO / UPN (docs/architecture.md A.2):
* PatchEmbed: zero-pad right/bottom to a multiple of the patch size, Conv k=s=patch, LayerNorm.
* Blocks alternate shift 0 / window//2. Inside a block, after LN1 the map is zero-padded to
  window multiples; the padded tokens are NOT masked as keys (as in the official code), so a
  zero-padded batch gives slightly different numbers from a single unpadded image.
* Relative position bias from a [(2w-1)^2, heads] table; the index is rebuilt here (the
  checkpoint's `relative_position_index` buffer is checked by the converter and dropped).
* PatchMerging: pad odd sizes, concat sub-grids (r0c0, r1c0, r0c1, r1c1), LayerNorm(4C),
  Linear 4C -> 2C without bias.
* Stage outputs are taken before PatchMerging and pass an extra LayerNorm `norm{i}`.

Parameter tree: patch_embed/{proj, norm}, layers_{i}_blocks_{j}/{norm1, attn/{qkv, proj,
relative_position_bias_table}, norm2, mlp/{fc1, fc2}}, layers_{i}_downsample/{norm, reduction},
norm{i} (torch `layers.{i}.blocks.{j}.*` etc.; see convert/upn.py).
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from chatrex_jax.models.upn.deformable import dense, layer_norm
from chatrex_jax.ops.window_attention import window_attention

Dtype = jnp.dtype


@dataclasses.dataclass(frozen=True)
class SwinConfig:
  """Swin hyper-parameters (official argument names)."""
  embed_dim: int = 192
  depths: tuple[int, ...] = (2, 2, 18, 2)
  num_heads: tuple[int, ...] = (6, 12, 24, 48)
  window_size: int = 12
  patch_size: int = 4
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  out_indices: tuple[int, ...] = (0, 1, 2, 3)

  @property
  def num_features(self) -> tuple[int, ...]:
    return tuple(self.embed_dim * 2 ** i for i in range(len(self.depths)))

  @classmethod
  def from_official(cls, cfg: dict) -> "SwinConfig":
    """From an official `SwinTransformer` kwargs dict (unknown/training-only keys ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in names}
    return cls(**kw)


SWIN_VARIANTS = {
    "swin_T_224_1k": SwinConfig(96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin_B_224_22k": SwinConfig(128, (2, 2, 18, 2), (4, 8, 16, 32), 7),
    "swin_B_384_22k": SwinConfig(128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
    "swin_L_224_22k": SwinConfig(192, (2, 2, 18, 2), (6, 12, 24, 48), 7),
    "swin_L_384_22k": SwinConfig(192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
}


@functools.lru_cache(maxsize=None)
def relative_position_index(window: int) -> np.ndarray:
  """[w*w, w*w] int64: (dh + w - 1) * (2w - 1) + (dw + w - 1), the official buffer."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
  return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).astype(np.int64)


@functools.lru_cache(maxsize=None)
def shift_attention_mask(hp: int, wp: int, window: int, shift: int) -> np.ndarray:
  """[nW, w*w, w*w] float32: -100 between tokens of different shifted regions, else 0."""
  img = np.zeros((hp, wp), np.float32)
  cnt = 0
  for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
    for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
      img[hs, ws] = cnt
      cnt += 1
  win = img.reshape(hp // window, window, wp // window, window).transpose(0, 2, 1, 3).reshape(
      -1, window * window)
  diff = win[:, None, :] - win[:, :, None]
  return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def window_partition(x: jnp.ndarray, window: int) -> jnp.ndarray:
  """[B, Hp, Wp, C] -> [B * nW, w*w, C], windows in row-major order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, c)


def window_reverse(windows: jnp.ndarray, window: int, h: int, w: int) -> jnp.ndarray:
  """[B * nW, w*w, C] -> [B, Hp, Wp, C]."""
  c = windows.shape[-1]
  x = windows.reshape(-1, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, h, w, c)


class WindowAttention(nn.Module):
  """Window multi-head self-attention with relative position bias.

  x: [B*nW, M, C] (M = window^2); mask: [nW, M, M] additive or None -> [B*nW, M, C].
  """
  dim: int
  num_heads: int
  window_size: int
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    bw, m, c = x.shape
    nh = self.num_heads
    hd = c // nh
    table = self.param("relative_position_bias_table",
                       nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02),
                                                    (None, "heads")),
                       ((2 * self.window_size - 1) ** 2, nh), jnp.float32)
    qkv = dense(3 * c, "qkv", use_bias=self.qkv_bias, dtype=self.dtype)(x)
    index = relative_position_index(self.window_size).reshape(-1)
    bias = jnp.asarray(table)[index].reshape(m, m, nh).transpose(2, 0, 1)
    # A few windows at a time, so their scores stay in cache (ops/window_attention.py).
    out = window_attention(qkv.reshape(bw, m, 3, nh, hd), bias, mask,
                           scale=hd ** -0.5).reshape(bw, m, c)
    return dense(c, "proj", ("mlp", "embed"), dtype=self.dtype)(out)


class SwinMlp(nn.Module):
  """fc1 (C -> ratio*C), exact-erf GELU, fc2."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = dense(self.hidden, "fc1", ("embed", "mlp"), dtype=self.dtype)(x)
    x = nn.gelu(x, approximate=False)
    return dense(c, "fc2", ("mlp", "embed"), dtype=self.dtype)(x)


class SwinBlock(nn.Module):
  """One (shifted-)window block. x: [B, H, W, C] -> [B, H, W, C]."""
  dim: int
  num_heads: int
  window_size: int
  shift_size: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, h, w, c = x.shape
    ws, s = self.window_size, self.shift_size
    shortcut = x
    x = layer_norm("norm1")(x).astype(self.dtype)
    pad_b, pad_r = (-h) % ws, (-w) % ws
    if pad_b or pad_r:  # zero padding after LN1, not masked (official behaviour)
      x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    hp, wp = h + pad_b, w + pad_r
    mask = None
    if s > 0:
      x = jnp.roll(x, (-s, -s), axis=(1, 2))
      mask = jnp.asarray(shift_attention_mask(hp, wp, ws, s))
    windows = window_partition(x, ws)
    windows = WindowAttention(c, self.num_heads, ws, self.qkv_bias, self.dtype, name="attn")(windows, mask)
    x = window_reverse(windows, ws, hp, wp)
    if s > 0:
      x = jnp.roll(x, (s, s), axis=(1, 2))
    x = shortcut + x[:, :h, :w, :]
    x = nn.with_logical_constraint(x, ("activation_batch", None, None, "activation_embed"))
    y = layer_norm("norm2")(x).astype(self.dtype)
    return x + SwinMlp(int(c * self.mlp_ratio), self.dtype, name="mlp")(y)


class PatchMerging(nn.Module):
  """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, h, w, c = x.shape
    if h % 2 or w % 2:
      x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    x = layer_norm("norm")(x).astype(self.dtype)
    return dense(2 * c, "reduction", ("mlp", "embed"), use_bias=False, dtype=self.dtype)(x)


class PatchEmbed(nn.Module):
  """[B, H, W, 3] -> [B, ceil(H/p), ceil(W/p), embed_dim] (Conv k=s=p, then LayerNorm)."""
  embed_dim: int
  patch_size: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    p = self.patch_size
    _, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, (-h) % p), (0, (-w) % p), (0, 0)))
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj",
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                         (None, None, "conv_in", "conv_out")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))(x)
    return layer_norm("norm")(x).astype(self.dtype)


class SwinTransformer(nn.Module):
  """images [B, H, W, 3] float (normalised, NHWC) -> list of stage maps [B, H_i, W_i, C_i]
  for `out_indices` (strides 4, 8, 16, 32), each after its output LayerNorm `norm{i}`."""
  config: SwinConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> list[jnp.ndarray]:
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"Swin expects NHWC RGB images [B, H, W, 3], got shape {images.shape}")
    x = PatchEmbed(cfg.embed_dim, cfg.patch_size, self.dtype, name="patch_embed")(images.astype(self.dtype))
    outs = []
    for i, depth in enumerate(cfg.depths):
      dim = cfg.num_features[i]
      for j in range(depth):
        x = SwinBlock(dim, cfg.num_heads[i], cfg.window_size,
                      0 if j % 2 == 0 else cfg.window_size // 2, cfg.mlp_ratio, cfg.qkv_bias,
                      self.dtype, name=f"layers_{i}_blocks_{j}")(x)
      if i in cfg.out_indices:
        outs.append(layer_norm(f"norm{i}")(x).astype(jnp.float32))
      if i < len(cfg.depths) - 1:
        x = PatchMerging(self.dtype, name=f"layers_{i}_downsample")(x)
    return outs
