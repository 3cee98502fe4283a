"""ConvNeXt tower (stem + 4 stages, every stage map returned) as Flax Linen modules.

The high-resolution tower of ChatRex (docs/architecture.md B.4): the trunk of open_clip `convnext_large_d_320`
(= timm `convnext_large`), depths [3, 3, 27, 3], dims [192, 384, 768, 1536], at 768 px.

  stem:    Conv k4 s4 (bias) -> LayerNorm over channels (eps 1e-6)
  stage s: [s > 0: LayerNorm -> Conv k2 s2 (bias)] -> depths[s] blocks
  block:   y = dwconv7x7(x) -> LayerNorm -> fc1 (C->4C) -> GELU (erf) -> fc2 (4C->C)
           out = x + drop_path(layer_scale * y)
  outputs: the 4 raw stage maps (no final norm), strides 4, 8, 16, 32.

Layout: **NHWC throughout** (input [B, H, W, 3], outputs [B, H/4, W/4, dims[0]], ...), unlike
the torch NCHW maps; `chatrex_jax.convert.convnext` translates the weights. The stem output is
sown into the `intermediates` collection as `stem` (debug aid; `apply(..., mutable=
["intermediates"])`).

Training: stochastic depth (timm DropPath: per-sample, scaled by 1/keep, rates linear from 0
to `drop_path_rate` over all blocks) is active when `deterministic=False` and needs a
`dropout` rng; `remat=True` rematerialises each block in the backward pass.

Einsum letters: B batch, Y/X height/width, C channels, F MLP width.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from chatrex_jax.models import layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
  """Hyper-parameters (timm / RexSeek argument names). Defaults: ConvNeXt-Large."""
  depths: tuple[int, ...] = (3, 3, 27, 3)
  dims: tuple[int, ...] = (192, 384, 768, 1536)
  in_chans: int = 3
  patch_size: int = 4
  kernel_size: int = 7
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  ls_init_value: float | None = 1e-6
  drop_path_rate: float = 0.0
  remat: bool = False
  # Depthwise conv: "shift" = 49 shifted multiply-adds (fast on CPU, fused by XLA),
  # "conv" = lax.conv_general_dilated(feature_group_count=C), "auto" = shift on CPU else conv.
  dwconv_impl: str = "auto"
  # Upper bound (bytes) of one row chunk's [.., 4C] MLP activation; larger maps run the block
  # MLP chunk by chunk (lax.map). 0 disables chunking.
  mlp_chunk_bytes: int = 32 * 2**20
  dtype: Dtype = jnp.float32        # compute dtype (LayerNorm statistics always fp32)
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
    object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
    if len(self.depths) != len(self.dims):
      raise ValueError(f"depths {self.depths} and dims {self.dims} differ in length")
    if self.kernel_size % 2 != 1:
      raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
    if self.dwconv_impl not in ("auto", "shift", "conv"):
      raise ValueError(f"dwconv_impl must be 'auto', 'shift' or 'conv', got {self.dwconv_impl!r}")

  @property
  def num_stages(self) -> int:
    return len(self.depths)

  def drop_path_rates(self) -> list[list[float]]:
    """Per-stage, per-block drop rates: linspace(0, rate, sum(depths)) split by stage (timm)."""
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)) if sum(self.depths) else []
    out, i = [], 0
    for d in self.depths:
      out.append([float(r) for r in rates[i:i + d]])
      i += d
    return out

  @classmethod
  def from_dict(cls, d: Mapping, **overrides) -> "ConvNeXtConfig":
    """From timm/RexSeek-style kwargs (`kernel_sizes` accepted for `kernel_size`).

    Options the port does not implement (conv_mlp, use_grn, non-patch stems, conv_bias=False,
    non-GELU activations) raise instead of being silently ignored.
    """
    d = dict(d)
    unsupported = {"conv_mlp": False, "use_grn": False, "conv_bias": True, "stem_type": "patch",
                   "act_layer": "gelu", "output_stride": 32, "head_norm_first": False}
    for k, ok in unsupported.items():
      if k in d and d[k] is not None and d[k] != ok:
        raise ValueError(f"ConvNeXt option {k}={d[k]!r} is not supported (only {ok!r})")
    if d.get("norm_eps") is None:
      d.pop("norm_eps", None)
    if "kernel_sizes" in d:
      ks = d.pop("kernel_sizes")
      ks = set(ks) if isinstance(ks, (list, tuple)) else {ks}
      if len(ks) != 1:
        raise ValueError(f"per-stage kernel sizes {sorted(ks)} are not supported")
      d["kernel_size"] = ks.pop()
    names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype"}
    kw = {k: v for k, v in d.items() if k in names}
    kw.update(overrides)
    return cls(**kw)


def _layer_norm(cfg: ConvNeXtConfig, name: str) -> nn.LayerNorm:
  return layers.layer_norm(cfg.norm_eps, cfg.param_dtype, name)


def _trunc_normal(std=0.02):
  return nn.initializers.truncated_normal(std)


class PatchConv(nn.Module):
  """Conv with kernel == stride, VALID padding, bias: [B,H,W,C] -> [B,H/k,W/k,features].

  Done as a reshape + matmul over non-overlapping patches (same numbers as the conv).
  Kernel [k, k, C, features] (Flax conv layout).
  """
  features: int
  kernel: int
  cfg: ConvNeXtConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, k = self.cfg, self.kernel
    b, h, w, c = x.shape
    kernel = self.param("kernel", nn.with_logical_partitioning(_trunc_normal(),
                                                               (None, None, "conv_in", "conv_out")),
                        (k, k, c, self.features), cfg.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                      (self.features,), cfg.param_dtype)
    gy, gx = h // k, w // k
    x = x[:, :gy * k, :gx * k].astype(cfg.dtype).reshape(b, gy, k, gx, k, c)
    y = jnp.einsum("BYiXjC,ijCF->BYXF", x, kernel.astype(cfg.dtype))
    return y + bias.astype(cfg.dtype)


def _dw_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  r = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding=((r, r), (r, r)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _dw_shift_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """sum_{i,j} pad(x)[:, i:i+Y, j:j+X] * kernel[i, j], the k*k terms in row-major order: one
  fused multiply-add loop over the map, vectorised along the channels.

  The optimization barrier keeps XLA:CPU from fusing the sum into the next LayerNorm + fc1
  matmul, which would materialise every shifted copy of the map as an operand of that fusion
  (~20x the map's memory at ConvNeXt-L / 768 px). A `fori_loop` over the kernel rows did the
  same at 3-4x the time (ConvNeXt-L stage 3 block at 768 px: 24 against 7.8 ms; PyTorch 4.8).
  """
  k = kernel.shape[0]
  r = k // 2
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
  taps = kernel[:, :, 0, :]
  acc = None
  for i in range(k):
    for j in range(k):
      term = xp[:, i:i + h, j:j + w, :] * taps[i, j]
      acc = term if acc is None else acc + term
  return jax.lax.optimization_barrier(acc)


@jax.custom_vjp
def _dw_shift(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _dw_shift_sum(x, kernel)


def _dw_shift_fwd(x, kernel):
  return _dw_shift_sum(x, kernel), (x, kernel)


def _dw_shift_bwd(res, g):
  # The gradient of k*k shifted slices compiles slowly (k*k pads); the grouped conv's own
  # transposes are the same maths in two ops.
  x, kernel = res
  return jax.vjp(_dw_conv, x, kernel)[1](g)


_dw_shift.defvjp(_dw_shift_fwd, _dw_shift_bwd)


def depthwise_conv(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
  """Depthwise 'same' conv, stride 1, zero padding: x [B,Y,X,C], kernel [k,k,1,C] -> [B,Y,X,C].

  impl "shift": sum of k*k shifted slices times the per-channel taps (one fused loop; about
  10x faster than XLA's grouped conv on CPU); its backward uses the grouped conv's.
  impl "conv": `lax.conv_general_dilated(feature_group_count=C)` (accelerators).
  impl "auto": "shift" on the CPU backend, else "conv".
  """
  if impl == "auto":
    impl = "shift" if jax.default_backend() == "cpu" else "conv"
  if impl == "conv":
    return _dw_conv(x, kernel)
  if impl == "shift":
    return _dw_shift(x, kernel)
  raise ValueError(f"unknown depthwise conv impl {impl!r}")


class DepthwiseConv(nn.Module):
  """Depthwise k x k conv, stride 1, 'same' zero padding, bias: [B,Y,X,C] -> [B,Y,X,C].

  Params: kernel [k, k, 1, C] (Flax grouped-conv layout), bias [C].
  """
  cfg: ConvNeXtConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    k, c = cfg.kernel_size, x.shape[-1]
    kernel = self.param("kernel",
                        nn.with_logical_partitioning(_trunc_normal(), (None, None, None, "conv_out")),
                        (k, k, 1, c), cfg.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                      (c,), cfg.param_dtype)
    y = depthwise_conv(x.astype(cfg.dtype), kernel.astype(cfg.dtype), cfg.dwconv_impl)
    return y + bias.astype(cfg.dtype)


class _Affine(nn.Module):
  """Declares `kernel` [in, out] (or `scale` [C] for norms) and `bias`, returns them.

  Lets the block run its MLP as plain functions (over row chunks under `lax.map`) while the
  parameter tree stays `fc1/{kernel,bias}`, `norm/{scale,bias}` like nn.Dense / nn.LayerNorm.
  """
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  cfg: ConvNeXtConfig
  norm: bool = False

  @nn.compact
  def __call__(self):
    init = nn.initializers.ones if self.norm else _trunc_normal()
    w = self.param("scale" if self.norm else "kernel", nn.with_logical_partitioning(init, self.axes),
                   self.shape, self.cfg.param_dtype)
    b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[-1:]),
                   self.shape[-1:], self.cfg.param_dtype)
    return w, b


def _mlp_chunks(shape: tuple[int, ...], hidden: int, budget_bytes: int) -> int:
  """Smallest divisor n of the map height with B*(Y/n)*X*hidden*4 bytes <= budget (1 = off)."""
  b, h, w, _ = shape
  if budget_bytes <= 0:
    return 1
  for n in range(1, h + 1):
    if h % n == 0 and b * (h // n) * w * hidden * 4 <= budget_bytes:
      return n
  return h


class ConvNeXtBlock(nn.Module):
  """dwconv -> LN -> fc1 -> GELU -> fc2 -> layer scale -> drop path -> + x: [B,Y,X,C] -> same.

  On large maps the LN + MLP runs over row chunks (`cfg.mlp_chunk_bytes` bounds the [.., 4C]
  hidden activation of one chunk): same numbers, a fraction of the memory.
  """
  dim: int
  drop_path: float
  cfg: ConvNeXtConfig

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg, c = self.cfg, self.dim
    hidden = int(cfg.mlp_ratio * c)
    x = nn.with_logical_constraint(x, ("activation_batch", None, None, "activation_embed"))
    y = DepthwiseConv(cfg, name="conv_dw")(x)
    ln_s, ln_b = _Affine((c,), ("norm",), cfg, norm=True, name="norm")()
    k1, b1 = _Affine((c, hidden), ("embed", "mlp"), cfg, name="fc1")()
    k2, b2 = _Affine((hidden, c), ("mlp", "embed"), cfg, name="fc2")()
    dt = cfg.dtype

    def mlp(v):  # [..., C] -> [..., C]; LayerNorm statistics in fp32 (two-pass variance)
      # One 2-d matmul per layer (as layers.Projection): XLA:CPU plans less scratch memory
      # for it than for [B, Y, X, C] inputs (ConvNeXt-L at 768: 531 instead of 624 MB peak).
      lead = v.shape[:-1]
      v32 = v.reshape(-1, c).astype(jnp.float32)
      mean = jnp.mean(v32, -1, keepdims=True)
      var = jnp.mean(jnp.square(v32 - mean), -1, keepdims=True)
      v = ((v32 - mean) * (jax.lax.rsqrt(var + cfg.norm_eps) * ln_s.astype(jnp.float32))
           + ln_b.astype(jnp.float32)).astype(dt)
      h = jax.nn.gelu(v @ k1.astype(dt) + b1.astype(dt), approximate=False)
      # Rows are batch-major, so the batch sharding carries over to the merged row axis.
      h = nn.with_logical_constraint(h, ("activation_batch", "activation_mlp"))
      return (h @ k2.astype(dt) + b2.astype(dt)).reshape(*lead, c)

    n = _mlp_chunks(y.shape, hidden, cfg.mlp_chunk_bytes)
    if n == 1:
      y = mlp(y)
    else:
      b, h, w, _ = y.shape
      chunks = jnp.moveaxis(y.reshape(b, n, h // n, w, c), 1, 0)
      y = jnp.moveaxis(jax.lax.map(mlp, chunks), 0, 1).reshape(b, h, w, c)
    if cfg.ls_init_value is not None:
      gamma = self.param("layer_scale",
                         nn.with_logical_partitioning(nn.initializers.constant(cfg.ls_init_value),
                                                      ("norm",)),
                         (c,), cfg.param_dtype)
      y = y * gamma.astype(dt)
    if self.drop_path > 0.0 and not deterministic:
      keep = 1.0 - self.drop_path
      mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0], 1, 1, 1))
      y = jnp.where(mask, y / keep, jnp.zeros_like(y))
    return x.astype(dt) + y


class ConvNeXtStage(nn.Module):
  """[optional LN + Conv k2 s2 downsample] + blocks: [B,Y,X,Cin] -> [B,Y',X',dim]."""
  index: int
  cfg: ConvNeXtConfig

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg, s = self.cfg, self.index
    dim = cfg.dims[s]
    if s > 0:
      x = _layer_norm(cfg, "downsample_norm")(x).astype(cfg.dtype)
      x = PatchConv(dim, 2, cfg, name="downsample_conv")(x)
    block_cls = nn.remat(ConvNeXtBlock, static_argnums=(2,)) if cfg.remat else ConvNeXtBlock
    for b, rate in enumerate(cfg.drop_path_rates()[s]):
      x = block_cls(dim, rate, cfg, name=f"blocks_{b}")(x, deterministic)
    return x


class ConvNeXt(nn.Module):
  """ConvNeXt trunk returning every stage map.

  __call__(images [B, H, W, in_chans] float NHWC, deterministic=True)
    -> tuple of num_stages maps, map s: [B, H / 2**(s+2), W / 2**(s+2), dims[s]] (NHWC).
  At 768 px for ConvNeXt-L: [B,192,192,192], [B,96,96,384], [B,48,48,768], [B,24,24,1536].
  H and W should be multiples of 32 (torch drops remainders the same way otherwise).
  """
  cfg: ConvNeXtConfig

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True) -> tuple[jax.Array, ...]:
    cfg = self.cfg
    if images.ndim != 4 or images.shape[-1] != cfg.in_chans:
      raise ValueError(f"ConvNeXt expects NHWC images [B, H, W, {cfg.in_chans}], got shape "
                       f"{images.shape} (torch NCHW input? transpose to NHWC first)")
    min_size = cfg.patch_size * 2 ** (cfg.num_stages - 1)
    if images.shape[1] < min_size or images.shape[2] < min_size:
      raise ValueError(f"images of {images.shape[1]}x{images.shape[2]} px are smaller than the "
                       f"total stride {min_size}")
    x = PatchConv(cfg.dims[0], cfg.patch_size, cfg, name="stem_conv")(images)
    x = _layer_norm(cfg, "stem_norm")(x).astype(cfg.dtype)
    self.sow("intermediates", "stem", x)
    outs = []
    for s in range(cfg.num_stages):
      x = ConvNeXtStage(s, cfg, name=f"stages_{s}")(x, deterministic)
      outs.append(x)
    return tuple(outs)


def to_nchw(maps: Sequence[jax.Array]) -> list[jax.Array]:
  """NHWC stage maps -> torch-style NCHW (for comparisons and the ROI code if it wants NCHW)."""
  return [jnp.transpose(m, (0, 3, 1, 2)) for m in maps]
