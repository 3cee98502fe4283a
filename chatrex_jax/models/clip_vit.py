"""CLIP vision tower (HF `CLIPVisionModel` computation) as Flax Linen modules.

The low-resolution tower of ChatRex (docs/architecture.md B.3): CLIP ViT-L/14 at 336 px, whose features are
`hidden_states[mm_vision_select_layer]` (default -2), CLS dropped ("patch") -> [B, 576, 1024].

Computation (identical to transformers' `CLIPVisionTransformer`):
  patches = Conv(k=P, s=P, no bias)(pixels)                   [B, Y, X, D] -> [B, Y*X, D]
  h0 = pre_layrnorm(concat(class_embedding, patches) + position_embedding)   [B, 1+Y*X, D]
  h_{i+1} = layer_i(h_i)    pre-LN: h += attn(ln1(h)); h += fc2(quick_gelu(fc1(ln2(h))))
  hidden_states = (h0, h1, ..., hL);  last_hidden_state = hL (no post-LN)
  pooler_output = post_layernorm(hL[:, 0])

Images enter NHWC ([B, H, W, 3], CLIP-normalised), as everywhere inside this package; the
converter (`chatrex_jax.convert.clip`) maps the torch NCHW conv weight. Only the layers up to
the selected one are run when neither all hidden states nor the last one are requested.

Einsum letters: B batch, T/S token positions, D width, N heads, H head dim, F MLP width.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from chatrex_jax.models import layers
from chatrex_jax.models.layers import Projection
from chatrex_jax.ops.full_attention import full_attention

Dtype = Any

_ACTS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Hyper-parameters of the CLIP vision tower (HF `CLIPVisionConfig` names).

  Defaults are openai/clip-vit-large-patch14-336 with LLaVA's feature selection.
  select_layer: index into hidden_states (0 = pre-LN'd embeddings, -1 = last layer).
  select_feature: "patch" (drop CLS) or "cls_patch" (keep it).
  """
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  image_size: int = 336
  patch_size: int = 14
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  select_layer: int = -2
  select_feature: str = "patch"
  interpolate_pos_encoding: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32        # compute dtype (norms and softmax always fp32)
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.hidden_act not in _ACTS:
      raise ValueError(f"hidden_act {self.hidden_act!r} not supported (one of {sorted(_ACTS)})")
    if self.select_feature not in ("patch", "cls_patch"):
      raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {self.select_feature!r}")
    n = self.num_hidden_layers
    if not -(n + 1) <= self.select_layer <= n:
      raise ValueError(f"select_layer {self.select_layer} out of range for {n} layers "
                       f"(hidden_states has {n + 1} entries)")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    return self.grid ** 2 + 1

  @property
  def select_index(self) -> int:
    """select_layer as a non-negative index into hidden_states."""
    return self.select_layer % (self.num_hidden_layers + 1)

  @classmethod
  def from_hf(cls, hf: Mapping, **overrides) -> "CLIPVisionConfig":
    """From a HF `CLIPVisionConfig` dict (or a full `CLIPConfig` dict with `vision_config`).

    `mm_vision_select_layer` / `mm_vision_select_feature` (LLaVA/RexSeek MLLM config names)
    are honoured when present; `overrides` win over everything.
    """
    hf = dict(hf)
    if "vision_config" in hf and isinstance(hf["vision_config"], Mapping):
      outer, hf = hf, dict(hf["vision_config"])
      for k in ("mm_vision_select_layer", "mm_vision_select_feature"):
        if k in outer:
          hf.setdefault(k, outer[k])
    kw = {f.name: hf[f.name] for f in dataclasses.fields(cls)
          if f.name in hf and f.name not in ("dtype", "param_dtype")}
    if "mm_vision_select_layer" in hf:
      kw["select_layer"] = int(hf["mm_vision_select_layer"])
    if "mm_vision_select_feature" in hf:
      kw["select_feature"] = hf["mm_vision_select_feature"]
    kw.update(overrides)
    return cls(**kw)


def _dense(features, axes, cfg: CLIPVisionConfig, name: str) -> nn.Dense:
  return nn.Dense(
      features, dtype=cfg.dtype, param_dtype=cfg.param_dtype, precision=None, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


def _layer_norm(cfg: CLIPVisionConfig, name: str) -> nn.LayerNorm:
  return layers.layer_norm(cfg.layer_norm_eps, cfg.param_dtype, name)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """PyTorch's cubic-convolution weights for taps at offsets -1, 0, 1, 2."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):   # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] matrix of torch `interpolate(mode="bicubic", align_corners=False)` (size given).

  Source coordinate (d + 0.5) * n_in / n_out - 0.5, taps clamped at the borders, A = -0.75.
  """
  scale = n_in / n_out
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
  idx = np.floor(src)
  w = _cubic_weights(src - idx)
  m = np.zeros((n_out, n_in), np.float64)
  for k in range(4):
    cols = np.clip(idx.astype(np.int64) - 1 + k, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), cols), w[:, k])
  return m.astype(np.float32)


def interpolate_position_embedding(pos: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
  """Resizes [1 + g*g, D] position embeddings to a (gy, gx) patch grid, as HF CLIP does.

  Bicubic (A=-0.75, align_corners=False) on the patch part, CLS row kept: [1 + gy*gx, D].
  """
  n, d = pos.shape
  g = int(round((n - 1) ** 0.5))
  if g * g != n - 1:
    raise ValueError(f"position embedding of {n - 1} patches is not a square grid")
  gy, gx = grid_hw
  if (gy, gx) == (g, g):
    return pos
  patch = pos[1:].reshape(g, g, d).astype(jnp.float32)
  my, mx = jnp.asarray(bicubic_matrix(g, gy)), jnp.asarray(bicubic_matrix(g, gx))
  patch = jnp.einsum("Yy,yxD,Xx->YXD", my, patch, mx, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([pos[:1].astype(jnp.float32), patch.reshape(gy * gx, d)], 0).astype(pos.dtype)


class CLIPVisionEmbeddings(nn.Module):
  """Patch embedding + class token + learned positions: [B,H,W,C] -> [B, 1+Y*X, D]."""
  cfg: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, h, w, c = pixels.shape
    p = cfg.patch_size
    if c != cfg.num_channels:
      raise ValueError(f"CLIP expects NHWC images with {cfg.num_channels} channels, got shape "
                       f"{pixels.shape} (torch NCHW input? transpose to NHWC first)")
    gy, gx = h // p, w // p
    if (gy, gx) != (cfg.grid, cfg.grid) and not cfg.interpolate_pos_encoding:
      raise ValueError(f"input {h}x{w} gives a {gy}x{gx} patch grid but the model was trained at "
                       f"{cfg.image_size}px ({cfg.grid}x{cfg.grid}); set interpolate_pos_encoding=True")
    kernel = self.param(
        "patch_embedding",
        nn.with_logical_partitioning(nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                                     (None, None, "conv_in", "embed")),
        (p, p, c, cfg.hidden_size), cfg.param_dtype)
    cls = self.param("class_embedding",
                     nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                     (cfg.hidden_size,), cfg.param_dtype)
    pos = self.param("position_embedding",
                     nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                     (cfg.num_positions, cfg.hidden_size), cfg.param_dtype)
    # A stride == kernel conv with VALID padding is a matmul over non-overlapping patches
    # (the torch conv drops the remainder rows/columns the same way).
    x = pixels[:, :gy * p, :gx * p, :].astype(cfg.dtype)
    x = x.reshape(b, gy, p, gx, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gy * gx, p, p, c)
    x = jnp.einsum("btijc,ijcD->btD", x, kernel.astype(cfg.dtype))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(cfg.dtype), (b, 1, cfg.hidden_size)), x], 1)
    if cfg.interpolate_pos_encoding:
      pos = interpolate_position_embedding(pos, (gy, gx))
    return x + pos.astype(cfg.dtype)[None]


class CLIPAttention(nn.Module):
  """Bidirectional multi-head self-attention (no mask): [B,T,D] -> [B,T,D]."""
  cfg: CLIPVisionConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    n, hd = cfg.num_attention_heads, cfg.head_dim

    def proj(name):  # layers.Projection: flax DenseGeneral breaks under logical-axis rules
      return Projection((n, hd), ("embed",), ("heads", "head_dim"), dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype, name=name)
    q = proj("q_proj")(x) * jnp.asarray(hd ** -0.5, cfg.dtype)
    k = proj("k_proj")(x)
    v = proj("v_proj")(x)
    o = full_attention(q, k, v)   # scores and softmax in fp32
    return Projection((cfg.hidden_size,), ("heads", "head_dim"), ("embed",), dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, name="out_proj")(o)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN transformer layer: [B,T,D] -> [B,T,D]."""
  cfg: CLIPVisionConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    act = _ACTS[cfg.hidden_act]
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    h = _layer_norm(cfg, "layer_norm1")(x).astype(cfg.dtype)
    x = x + CLIPAttention(cfg, name="self_attn")(h)
    h = _layer_norm(cfg, "layer_norm2")(x).astype(cfg.dtype)
    h = _dense(cfg.intermediate_size, ("embed", "mlp"), cfg, "fc1")(h)
    h = nn.with_logical_constraint(act(h), ("activation_batch", "activation_length", "activation_mlp"))
    return x + _dense(cfg.hidden_size, ("mlp", "embed"), cfg, "fc2")(h)


class CLIPVisionTower(nn.Module):
  """The CLIP vision model with LLaVA/RexSeek feature selection.

  __call__(pixels [B, H, W, C] float, NHWC, CLIP-normalised, output=...):
    output="features" (default): hidden_states[select_layer] with CLS dropped for
      select_feature="patch": [B, Y*X, D] (row-major patch order), or [B, 1+Y*X, D].
    output="all": dict with `features`, `hidden_states` [L+1, B, 1+Y*X, D],
      `last_hidden_state` [B, 1+Y*X, D] and `pooler_output` [B, D] (post_layernorm(CLS)).
  Parameters: embeddings/{patch_embedding [P,P,C,D], class_embedding [D],
  position_embedding [1+g*g, D]}, pre_layrnorm, layers_{i}/..., post_layernorm.
  """
  cfg: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixels: jax.Array, output: str = "features"):
    cfg = self.cfg
    if output not in ("features", "all"):
      raise ValueError(f"output must be 'features' or 'all', got {output!r}")
    if pixels.ndim != 4:
      raise ValueError(f"pixels must be [B, H, W, C], got shape {pixels.shape}")
    x = CLIPVisionEmbeddings(cfg, name="embeddings")(pixels)
    x = _layer_norm(cfg, "pre_layrnorm")(x).astype(cfg.dtype)
    hidden = [x]
    n_run = cfg.num_hidden_layers if output == "all" else cfg.select_index
    layer_cls = nn.remat(CLIPEncoderLayer) if cfg.remat else CLIPEncoderLayer
    for i in range(cfg.num_hidden_layers):
      layer = layer_cls(cfg, name=f"layers_{i}")
      if i < n_run:
        x = layer(x)
        hidden.append(x)
      elif self.is_initializing():
        layer(x)  # create every layer's parameters, even those the features do not use
    post_ln = _layer_norm(cfg, "post_layernorm")
    feats = hidden[cfg.select_index]
    if cfg.select_feature == "patch":
      feats = feats[:, 1:]
    if output == "features":
      if self.is_initializing():
        post_ln(x[:, 0])
      return feats
    return {
        "features": feats,
        "hidden_states": jnp.stack(hidden),
        "last_hidden_state": x,
        "pooler_output": post_ln(x[:, 0]).astype(cfg.dtype),
    }
