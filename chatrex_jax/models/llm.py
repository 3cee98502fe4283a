"""Qwen2 / LLaMA-family decoder (HF `Qwen2ForCausalLM`, `LlamaForCausalLM`) in Flax Linen.

One module family covers both: Qwen2/Qwen2.5 (bias on q/k/v, RoPE theta 1e6) and
LLaMA/Vicuna (no bias, theta 1e4); everything else is read from the checkpoint's config.json
via `LLMConfig.from_hf`. RMSNorm, rotate-half RoPE, GQA, SwiGLU as HF computes them.

Attention works on *slots*: a sequence of length S (the prompt, or a KV cache of S slots).
Query slot t may attend key slot s iff s <= t, `key_valid[b, s]`, and (when given)
`segment_ids` agree. Positions (RoPE) are separate from slots, so left-padded batches use
HF's `cumsum(mask) - 1` positions while slots stay aligned across rows.

Shapes use the letters of `chatrex_jax/models/__init__.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from chatrex_jax.models.layers import Projection, dot_out_in
from chatrex_jax.ops import tpu_flash_attention
from chatrex_jax.ops.attention import causal_attention
from chatrex_jax.ops.cross_entropy import fused_cross_entropy

Array = jax.Array
KERNEL_LAYOUTS = ("in_out", "out_in", "out_in_fused")
Cache = dict  # {"k", "v"}: L arrays [B, K, S, H], or one [L, B, K, S, H] (see init_cache)


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """Decoder hyper-parameters (names follow HF config.json where one exists)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: Optional[int] = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  rope_scaling: Optional[tuple] = None  # sorted (key, value) pairs of HF's dict
  tie_word_embeddings: bool = False
  attention_bias: bool = True  # Qwen2: q/k/v bias; LLaMA: none
  max_position_embeddings: int = 32768
  family: str = "qwen2"  # "qwen2" | "llama"
  # std of the normal init of every matrix (HF `initializer_range`); how a network starts, not
  # what it is, so not compared. A from-scratch model this small needs more than HF's 0.02: at
  # 0.02 a 128-wide LLaMA trained with AdamW at 3e-3 never learned to copy a word from its
  # prompt (measured in PyTorch and here, README "The demo").
  initializer_range: float = dataclasses.field(default=0.02, compare=False)
  # config.json's own model_type ("chatrex" for the release), written back on export; a label
  # of the file, not of the network, so two configs of the same network compare equal.
  model_type: str = dataclasses.field(default="", compare=False)
  # Implementation choices (not in HF configs).
  dtype: Any = jnp.float32  # compute dtype of the matmuls (bf16 on accelerators)
  param_dtype: Any = jnp.float32
  # The residual stream (embeddings, every `x + f(x)`): fp32 by default even with bf16 matmuls.
  # Real models carry outlier activations of ~1e4 in it, where one bf16 ulp is ~1e2; summing
  # 2L block outputs there in bf16 is what moves bf16 logits away from fp32.
  residual_dtype: Any = jnp.float32
  scan_layers: bool = False
  # Layers per iteration of the scanned loop (`lax.scan`'s unroll). XLA's cost analysis counts
  # a loop body once: the AOT FLOP count (tools/roofline.py) sets it to the layer count.
  scan_unroll: int = 1
  remat_policy: str = "none"  # none | full | dots | dots_no_batch
  # Chunks of every row's positions in the fused LM head + cross-entropy (`token_loss`): 0 =
  # about 2^23 logits per chunk (a one-device budget). Under data parallelism every chunk's
  # head gradient is reduced across devices, so sharded runs want a few (1: all logits at once).
  loss_chunks: int = 0
  # Attention without a cache: "xla" (ops/attention.py, any backend), "pallas_tpu" (jax's Pallas
  # flash-attention kernel, ops/tpu_flash_attention.py: no scores in HBM), "auto" = "pallas_tpu"
  # on the TPU backend. The kernel blocks lengths that are multiples of 128; other lengths
  # (init's dummy inputs, short scoring calls) take the XLA path, the same maths. Compiling for
  # TPU from a CPU host (tools/aot.py) names "pallas_tpu" itself.
  attention_impl: str = "auto"
  # How the projection matrices are stored: "in_out" ([D_in, D_out], x . W, Flax's and the
  # training configs' layout) or "out_in" ([D_out, D_in], torch nn.Linear's, which the inference
  # loaders use: XLA:CPU's products of a few rows, i.e. decoding, mostly run faster against it,
  # a 125M model's step by 12-14%; and a torch checkpoint loads without transposes), or
  # "out_in_fused": "out_in" with q, k and v stored as one `qkv_proj` kernel [N + 2K, H, D] and
  # gate and up as one `gate_up_proj` [2, F, D], one wider product each where decoding streams
  # the weights (`change_kernel_layout` makes it). The fused axis is not sharded: a one-host
  # inference layout, like the loaders' "out_in".
  kernel_layout: str = "in_out"

  def __post_init__(self):
    if self.attention_impl not in ("auto", "xla", "pallas_tpu"):
      raise ValueError(f"attention_impl must be 'auto', 'xla' or 'pallas_tpu', got {self.attention_impl!r}")
    if self.kernel_layout not in KERNEL_LAYOUTS:
      raise ValueError(f"kernel_layout must be one of {KERNEL_LAYOUTS}, got {self.kernel_layout!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads={self.num_key_value_heads}")
    if self.family not in ("qwen2", "llama"):
      raise ValueError(f"family must be 'qwen2' or 'llama', got {self.family!r}")

  @property
  def kernel_out_first(self) -> bool:
    """Projection kernels stored [out, in] (torch's order)."""
    return self.kernel_layout != "in_out"

  @property
  def fused_projections(self) -> bool:
    return self.kernel_layout == "out_in_fused"

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def rope_scaling_dict(self) -> Optional[dict]:
    return dict(self.rope_scaling) if self.rope_scaling else None

  @classmethod
  def from_hf(cls, hf: dict, *, qkv_bias: Optional[bool] = None, tokenizer_class: Optional[str] = None,
              **overrides) -> "LLMConfig":
    """From a HF config.json dict (Qwen2Config / LlamaConfig, transformers 4.x or 5.x).

    The family and every default come from what the checkpoint's files say (`infer_family`):
    qkv_bias: whether the weights hold q/k/v bias tensors (None: not looked at);
    tokenizer_class: tokenizer_config.json's `tokenizer_class` (None: unknown).
    Missing fields take the HF config classes' defaults (rope_theta 1e4, rms_norm_eps 1e-6,
    no bias for LLaMA), never a family guess. `family=` in overrides skips the inference.
    """
    family = overrides.pop("family", None) or infer_family(hf, qkv_bias=qkv_bias,
                                                            tokenizer_class=tokenizer_class)
    rope_params = hf.get("rope_parameters") or {}
    rope_theta = hf.get("rope_theta", rope_params.get("rope_theta"))
    if rope_theta is None:
      rope_theta = HF_DEFAULT_ROPE_THETA
    scaling = hf.get("rope_scaling") or None
    if scaling is None and rope_params.get("rope_type", "default") != "default":
      scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
      scaling = None
    if hf.get("use_sliding_window", False):
      raise ValueError("sliding-window attention is not supported (use_sliding_window=true)")
    if family == "qwen2":
      bias = True   # Qwen2 always has q/k/v bias (Qwen2Config has no switch)
    elif "attention_bias" in hf:
      bias = bool(hf["attention_bias"])
    else:
      bias = bool(qkv_bias)
    if qkv_bias is not None and qkv_bias != bias:
      raise ValueError(
          f"config.json and the weights disagree: family {family!r}"
          + (f" with attention_bias={hf['attention_bias']}" if "attention_bias" in hf else "")
          + f" means q/k/v bias {bias}, but the weights {'have' if qkv_bias else 'lack'} "
          "q/k/v bias tensors; fix `attention_bias` / `model_type` in config.json")
    kw = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), rms_norm_eps=hf.get("rms_norm_eps", HF_DEFAULT_RMS_EPS),
        rope_theta=float(rope_theta),
        rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), attention_bias=bias,
        max_position_embeddings=hf.get("max_position_embeddings", 32768), family=family,
        model_type=str(hf.get("model_type") or family),
        initializer_range=float(hf.get("initializer_range", 0.02)))
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (SwiGLU needs silu)")
    kw.update(overrides)
    return cls(**kw)

  def to_hf(self) -> dict:
    """A HF config.json dict that `from_pretrained` accepts for the written checkpoint."""
    arch = "Qwen2ForCausalLM" if self.family == "qwen2" else "LlamaForCausalLM"
    out = dict(
        architectures=[arch], model_type=self.family, vocab_size=self.vocab_size,
        hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads, rms_norm_eps=self.rms_norm_eps,
        rope_theta=self.rope_theta, rope_scaling=self.rope_scaling_dict,
        tie_word_embeddings=self.tie_word_embeddings, hidden_act="silu",
        max_position_embeddings=self.max_position_embeddings,
        initializer_range=self.initializer_range, torch_dtype="float32")
    if self.head_dim is not None:
      out["head_dim"] = self.head_dim
    if self.family == "llama":
      out["attention_bias"] = self.attention_bias
    else:
      out["use_sliding_window"] = False
    return out


# HF config-class defaults (Qwen2Config and LlamaConfig agree) for fields a config.json omits.
HF_DEFAULT_ROPE_THETA = 10000.0
HF_DEFAULT_RMS_EPS = 1e-6

# What each kind of evidence says about the family.
FAMILY_OF_MODEL_TYPE = {"qwen2": "qwen2", "qwen2_5": "qwen2", "qwen": "qwen2", "rexseek_qwen": "qwen2",
                        "llama": "llama", "mistral": "llama", "vicuna": "llama", "llava": "llama",
                        "llava_llama": "llama"}
FAMILY_OF_TOKENIZER = {"Qwen2Tokenizer": "qwen2", "Qwen2TokenizerFast": "qwen2",
                       "LlamaTokenizer": "llama", "LlamaTokenizerFast": "llama",
                       "CodeLlamaTokenizer": "llama", "CodeLlamaTokenizerFast": "llama"}


def infer_family(hf: dict, *, qkv_bias: Optional[bool] = None,
                 tokenizer_class: Optional[str] = None) -> str:
  """The decoder family ("qwen2" or "llama") a checkpoint holds, from what its files say.

  Evidence: config.json's `model_type` and `architectures` when they name a family (the
  release says "chatrex", which names none), an explicit `attention_bias` field (LlamaConfig
  has it, Qwen2Config not), whether the weights hold q/k/v bias tensors (Qwen2 always does),
  and tokenizer_config.json's `tokenizer_class`. All that speak must agree; a ValueError names
  every source and what it says otherwise, and when none speaks.
  """
  votes: dict[str, str] = {}
  model_type = str(hf.get("model_type") or "").lower()
  if model_type in FAMILY_OF_MODEL_TYPE:
    votes[f"config.json model_type={model_type!r}"] = FAMILY_OF_MODEL_TYPE[model_type]
  for arch in hf.get("architectures") or []:
    low = arch.lower()
    if "qwen" in low or "llama" in low or "llava" in low:
      votes[f"config.json architectures={arch!r}"] = "qwen2" if "qwen" in low else "llama"
  if "attention_bias" in hf:
    votes["config.json attention_bias field"] = "llama"
  elif qkv_bias is not None:
    votes[f"weights {'with' if qkv_bias else 'without'} q/k/v bias"] = "qwen2" if qkv_bias else "llama"
  if tokenizer_class in FAMILY_OF_TOKENIZER:
    votes[f"tokenizer_class={tokenizer_class!r}"] = FAMILY_OF_TOKENIZER[tokenizer_class]
  families = set(votes.values())
  if len(families) == 1:
    return families.pop()
  said = "; ".join(f"{k} -> {v}" for k, v in votes.items())
  if not families:
    raise ValueError(f"cannot tell the LLM family (model_type={model_type!r}): nothing in the "
                     "checkpoint names Qwen2 or LLaMA; pass family='qwen2' or 'llama'")
  raise ValueError(f"the checkpoint disagrees on the LLM family: {said}. Fix the field that is "
                   "wrong (or pass family= explicitly)")


# ----------------------------------------------------------------------------- RoPE

def accumulation_dtype(dtype) -> np.dtype:
  """Where norms, RoPE angles, softmax and logits are computed: at least fp32 (fp64 stays
  fp64, so an x64 run is exact end to end)."""
  return np.dtype(jnp.promote_types(dtype, jnp.float32))


def rope_inv_freq(config: LLMConfig) -> tuple[np.ndarray, float]:
  """HF's `inv_freq` [H/2] (float32, as HF computes it; float64 for a float64 config) and
  attention scaling for the configured rope type."""
  dim = config.dim_per_head
  acc = accumulation_dtype(config.dtype).type
  base = acc(config.rope_theta)
  inv_freq = (1.0 / base ** (np.arange(0, dim, 2, dtype=np.int64).astype(acc) / dim)).astype(acc)
  scaling = config.rope_scaling_dict
  if not scaling:
    return inv_freq, 1.0
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind == "linear":
    return (inv_freq / acc(scaling["factor"])).astype(acc), 1.0
  if kind == "llama3":
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(acc), 1.0
  raise NotImplementedError(
      f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray, attn_scale: float = 1.0) -> Array:
  """Rotate-half RoPE as HF: x [B, T, N, H], positions [B, T] int -> [B, T, N, H]."""
  freqs = positions.astype(inv_freq.dtype)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  cos = (jnp.cos(emb) * attn_scale)[:, :, None, :].astype(x.dtype)
  sin = (jnp.sin(emb) * attn_scale)[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


# ----------------------------------------------------------------------------- layers

def _init(std: float, names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


class RMSNorm(nn.Module):
  """HF RMSNorm: normalise in fp32, cast back, then scale. x [..., D]."""
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(accumulation_dtype(self.dtype))
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


class Attention(nn.Module):
  """GQA self-attention with RoPE and an optional KV cache.

  x [B, T, D]; positions [B, T]; key_valid [B, S] (S = T without a cache, else cache slots);
  cache {"k","v": [B, K, S, H]}: the T new tokens go to slots cache_index..cache_index+T-1.
  A Python int 0 as cache_index (static) says the cache is empty: the prefill path, where the
  T tokens attend among themselves in causal blocks; a traced index scores every slot.
  Returns (out [B, T, D], None without a cache, else the updated cache).
  """
  config: LLMConfig

  @nn.compact
  def __call__(self, x, positions, key_valid, segment_ids=None, cache=None, cache_index=None):
    cfg = self.config
    n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
    g = n // k
    std = cfg.initializer_range

    acc = accumulation_dtype(cfg.dtype)

    def proj(name, heads, head_axis):  # results in fp32: RoPE rotates unrounded q / k
      return Projection((heads, h), ("embed",), (head_axis, "head_dim"), use_bias=cfg.attention_bias,
                        std=std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, out_dtype=acc,
                        kernel_out_first=cfg.kernel_out_first, name=name)(x)

    if cfg.fused_projections:   # one product, [B, T, N + 2K, H]
      qkv = proj("qkv_proj", n + 2 * k, None)
      q, key, value = qkv[:, :, :n], qkv[:, :, n:n + k], qkv[:, :, n + k:]
    else:
      q, key, value = proj("q_proj", n, "heads"), proj("k_proj", k, "kv_heads"), proj("v_proj", k, "kv_heads")
    value = value.astype(cfg.dtype)
    inv_freq, attn_scale = rope_inv_freq(cfg)
    q = apply_rope(q, positions, inv_freq, attn_scale).astype(cfg.dtype)
    key = apply_rope(key, positions, inv_freq, attn_scale).astype(cfg.dtype)
    q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))

    b, t = x.shape[:2]
    q = q.reshape(b, t, k, g, h)
    if cache is None:  # training / scoring: causal blocks, no [T, T] scores kept for backward
      return self._out_proj(self._causal(q, key, value, key_valid, segment_ids).reshape(b, t, n, h)), None
    write = lambda c, new: jax.lax.dynamic_update_slice_in_dim(
        c, new.transpose(0, 2, 1, 3).astype(c.dtype), cache_index, axis=2)       # [B, K, S, H]
    if isinstance(cache_index, int) and cache_index == 0:
      # Prefill of an empty cache (a static 0): the prompt attends within itself in causal
      # blocks, as in training, not to every slot of the cache (a [T, S] score matrix per layer).
      out = self._causal(q, key, value, key_valid[:, :t], None)
      return (self._out_proj(out.reshape(b, t, n, h)),
              {"k": write(cache["k"], key), "v": write(cache["v"], value)})
    # Decoding: the T new keys and values go into this layer's cache at `cache_index` first, in
    # place, and the queries then attend over its slots: the valid ones up to their own. Read
    # after the write, the old cache is dead, so XLA updates it where it lies; scoring the old
    # cache and the new keys apart (then writing) made XLA copy every layer's cache per token.
    # Dense scores (T is 1 per generated token). Packing (segment_ids) never comes with a cache.
    cache = {"k": write(cache["k"], key), "v": write(cache["v"], value)}
    slots = jnp.arange(cache["k"].shape[2])
    allowed = key_valid[:, None, :].astype(bool) & (
        slots[None, None, :] <= cache_index + jnp.arange(t)[None, :, None])                # [B, T, S]
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", q, cache["k"].astype(q.dtype),
                        preferred_element_type=acc) / acc.type(math.sqrt(h))
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(acc).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
    return self._out_proj(_mix_cache(probs, cache["v"], acc).reshape(b, t, n, h)), cache

  def _causal(self, q, key, value, key_valid, segment_ids):
    """Causal attention of T queries over the same T keys: [B, T, K, G, H]."""
    cfg = self.config
    kernel = cfg.attention_impl == "pallas_tpu" or (
        cfg.attention_impl == "auto" and jax.default_backend() == "tpu")
    if kernel and tpu_flash_attention.supported(q.shape[1]):
      return tpu_flash_attention.causal_attention(q, key, value, key_valid, segment_ids)
    return causal_attention(q, key, value, key_valid, segment_ids,
                            acc_dtype=accumulation_dtype(cfg.dtype))

  def _out_proj(self, out):
    cfg = self.config
    return Projection((cfg.hidden_size,), ("heads", "head_dim"), ("embed",), use_bias=False,
                      std=cfg.initializer_range, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      out_dtype=accumulation_dtype(cfg.dtype),
                      kernel_out_first=cfg.kernel_out_first, name="o_proj")(out)


def _mix_cache(probs: Array, v_cache: Array, acc) -> Array:
  """probs [B, K, G, T, S], v_cache [B, K, S, H] -> [B, T, K, G, H] in probs' dtype.

  One new token (T = 1) mixes the cache as a fused multiply-reduce over S: as a product it is
  B * K GEMMs of G rows that XLA:CPU runs one by one (batch 8, 1024 slots: 2.5 ms per layer,
  the multiply-reduce 0.6). Longer blocks (the prompt's prefill) are real GEMMs.
  """
  if probs.shape[3] == 1:
    prod = probs[:, :, :, 0, :, None].astype(acc) * v_cache[:, :, None].astype(acc)  # [B, K, G, S, H]
    return prod.sum(axis=3)[:, None].astype(probs.dtype)
  return jnp.einsum("BKGTS,BKSH->BTKGH", probs, v_cache.astype(probs.dtype))


@jax.checkpoint
def swiglu(gate: Array, up: Array) -> Array:
  """silu(gate) * up, keeping only gate and up for the backward pass: autodiff of the plain
  expression also keeps sigmoid(gate), silu(gate) and a product, three more [B, T, F] arrays
  per layer (576 MB of the 125M benchmark's 2 GB of activations) for an elementwise recompute."""
  return nn.silu(gate) * up


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)); x [B, T, D]."""
  config: LLMConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    acc = accumulation_dtype(cfg.dtype)

    def dense(name, features, names):  # bf16 inputs, fp32 results (see Projection.out_dtype)
      features = features if isinstance(features, tuple) else (features,)
      return Projection(features, names[:1], names[1:], use_bias=False,
                        std=cfg.initializer_range, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        out_dtype=acc, kernel_out_first=cfg.kernel_out_first, name=name)
    if cfg.fused_projections:   # one product, [B, T, 2, F]
      gate_up = dense("gate_up_proj", (2, cfg.intermediate_size), ("embed", None, "mlp"))(x)
      gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
    else:
      gate = dense("gate_proj", cfg.intermediate_size, ("embed", "mlp"))(x)
      up = dense("up_proj", cfg.intermediate_size, ("embed", "mlp"))(x)
    hidden = swiglu(gate, up)
    hidden = nn.with_logical_constraint(hidden, ("activation_batch", "activation_length", "activation_mlp"))
    return dense("down_proj", cfg.hidden_size, ("mlp", "embed"))(hidden)


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). Returns (x, the updated cache or None)."""
  config: LLMConfig

  @nn.compact
  def __call__(self, x, cache, positions, key_valid, segment_ids, cache_index):
    cfg = self.config
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)
    attn_out, cache = Attention(cfg, name="self_attn")(
        norm("input_layernorm")(x), positions, key_valid, segment_ids, cache, cache_index)
    x = x + attn_out
    x = x + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
    return x, cache


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class _ScannedLayer(nn.Module):
  """Adapter giving DecoderLayer nn.scan's (carry, xs) signature."""
  config: LLMConfig
  layer_cls: Any

  @nn.compact
  def __call__(self, x, cache, positions, key_valid, segment_ids, cache_index):
    return self.layer_cls(self.config, name="layer")(
        x, cache, positions, key_valid, segment_ids, cache_index)


class Decoder(nn.Module):
  """The decoder stack + final norm (HF `Qwen2Model` / `LlamaModel`, without embeddings)."""
  config: LLMConfig

  @nn.compact
  def __call__(self, x, positions, key_valid, segment_ids=None, cache=None, cache_index=None,
               return_hidden_states=False):
    cfg = self.config
    layer_cls = DecoderLayer
    if cfg.remat_policy != "none":
      if cfg.remat_policy not in _REMAT_POLICIES:
        raise ValueError(f"remat_policy {cfg.remat_policy!r} not in {['none', *_REMAT_POLICIES]}")
      layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat_policy],
                           prevent_cse=not cfg.scan_layers)
    hidden_states = [x] if return_hidden_states else None
    if cfg.scan_layers:
      if return_hidden_states:
        raise ValueError("return_hidden_states needs scan_layers=False")
      # With a cache, each layer's slice goes in and its updated slice comes out (the loop
      # rewrites the cache every step; unscanned layers update theirs in place).
      cache_axis = 0 if cache is not None else nn.broadcast
      scanned = nn.scan(
          _ScannedLayer, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(cache_axis, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
          out_axes=0, length=cfg.num_hidden_layers, unroll=cfg.scan_unroll,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x, new_cache = scanned(cfg, layer_cls, name="layers")(
          x, cache, positions, key_valid, segment_ids, cache_index)
    else:
      layer_caches = []
      for i in range(cfg.num_hidden_layers):
        layer_cache = None if cache is None else {name: cache[name][i] for name in cache}
        x, layer_cache = layer_cls(cfg, name=f"layers_{i}")(x, layer_cache, positions, key_valid,
                                                             segment_ids, cache_index)
        layer_caches.append(layer_cache)
        if return_hidden_states:
          hidden_states.append(x)
      new_cache = None if cache is None else {
          name: tuple(c[name] for c in layer_caches) for name in cache}
    x = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(x)
    if return_hidden_states:
      hidden_states[-1] = x  # HF convention: the last entry is after the final norm
    return x, new_cache, hidden_states


class CausalLM(nn.Module):
  """Embeddings + decoder + LM head (HF `*ForCausalLM`).

  Methods (call with `model.apply(vars, ..., method=...)`):
    embed(ids [B, T] int) -> [B, T, D]
    __call__(ids or inputs_embeds, positions, key_valid, ...) -> dict(logits, cache, ...)
    logits_from_hidden(h [B, T, D]) -> [B, T, V]
    token_loss(h [B, L, D], targets [B, L], valid [B, L]) -> (summed NLL, hits [B, L])
  """
  config: LLMConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.residual_dtype, param_dtype=cfg.param_dtype,
        embedding_init=_init(cfg.initializer_range, ("vocab", "embed")))
    self.decoder = Decoder(cfg)
    if not cfg.tie_word_embeddings and cfg.kernel_out_first:
      self.lm_head = Projection((cfg.vocab_size,), ("embed",), ("vocab",), use_bias=False,
                                std=cfg.initializer_range, dtype=cfg.dtype,
                                param_dtype=cfg.param_dtype, kernel_out_first=True)
    elif not cfg.tie_word_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype,
                              kernel_init=_init(cfg.initializer_range, ("embed", "vocab")))

  def embed(self, ids: Array) -> Array:
    return self.embed_tokens(ids)

  def logits_from_hidden(self, h: Array) -> Array:
    cfg = self.config
    # bf16 inputs, fp32 (accumulation dtype) outputs: logits of ~40 rounded to bf16 would move
    # by up to 0.125 (most of bf16's KL to fp32), so the product is never rounded to bf16.
    if cfg.tie_word_embeddings:  # the embedding [V, D] is an [out, in] kernel
      logits = dot_out_in(h.astype(cfg.dtype).reshape(-1, h.shape[-1]),
                          self.embed_tokens.embedding.astype(cfg.dtype),
                          out_dtype=accumulation_dtype(cfg.dtype)).reshape(*h.shape[:-1], -1)
    else:
      logits = self.lm_head(h)
    return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))

  def lm_head_weight(self) -> Array:
    """The LM head as a [D, V] matrix in the compute dtype (the embedding's transpose if tied)."""
    cfg = self.config
    if cfg.tie_word_embeddings:
      return self.embed_tokens.embedding.astype(cfg.dtype).T
    kernel = nn.unbox(self.lm_head.variables["params"]["kernel"]).astype(cfg.dtype)
    return kernel.T if cfg.kernel_out_first else kernel

  def token_loss(self, h: Array, targets: Array, valid: Array) -> tuple[Array, Array]:
    """Next-token cross-entropy from final hidden states, the logits never materialised.

    h [B, L, D] (after the final norm), targets [B, L] int (any value where not valid),
    valid [B, L] bool -> (summed NLL over valid tokens (fp32), hits [B, L] bool: valid and
    argmax-correct). Numerically `log_softmax(logits_from_hidden(h))` picked at the targets;
    see `ops.cross_entropy`.
    """
    cfg = self.config
    return fused_cross_entropy(h.astype(cfg.dtype), self.lm_head_weight(), targets, valid,
                               num_chunks=cfg.loss_chunks or None,
                               acc_dtype=accumulation_dtype(cfg.dtype))

  def __call__(self, ids: Optional[Array] = None, *, inputs_embeds: Optional[Array] = None,
               positions: Optional[Array] = None, key_valid: Optional[Array] = None,
               segment_ids: Optional[Array] = None, cache: Optional[Cache] = None,
               cache_index: Optional[Array] = None, return_hidden_states: bool = False,
               compute_logits: bool = True) -> dict:
    """Forward pass.

    ids [B, T] int or inputs_embeds [B, T, D]; positions [B, T] (default arange);
    key_valid [B, S] bool (default all True; S = T, or the cache length with a cache);
    segment_ids [B, T] for packed sequences (no cache); cache from `init_cache`.
    Returns {"logits": [B, T, V] (fp32), "hidden": [B, T, D], "cache", "hidden_states"}.
    """
    if (ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of ids / inputs_embeds")
    x = self.embed(ids) if inputs_embeds is None else inputs_embeds.astype(self.config.residual_dtype)
    b, t = x.shape[:2]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    if key_valid is None:
      s = t if cache is None else cache["k"].shape[-3]
      key_valid = jnp.ones((b, s), bool)
    if cache is not None and cache_index is None:
      cache_index = jnp.zeros((), jnp.int32)
    if cache is not None and segment_ids is not None:
      raise ValueError("segment_ids (packing) is for training; it cannot be combined with a cache")
    h, new_cache, hidden_states = self.decoder(x, positions, key_valid, segment_ids, cache,
                                               cache_index, return_hidden_states)
    out = {"hidden": h, "cache": new_cache, "hidden_states": hidden_states}
    if compute_logits:
      out["logits"] = self.logits_from_hidden(h).astype(accumulation_dtype(self.config.dtype))
    return out


def init_cache(config: LLMConfig, batch: int, length: int, dtype=None) -> Cache:
  """Zero KV cache {"k","v"}: one [B, K, S, H] array per layer (a tuple), or, for scanned
  layers, one [L, B, K, S, H] array (`lax.scan` slices its layer axis).

  Head-major: [B, K, S, H] is the operand layout of the decode step's score and mix products
  (batch axes B, K leading), and a layer's own array needs no slice of a stacked one, so an
  unscanned step writes each layer's new keys in place and copies nothing; the stacked
  [L, B, S, K, H] was sliced and transposed for every layer and token."""
  shape = (batch, config.num_key_value_heads, length, config.dim_per_head)
  dtype = dtype or config.dtype
  if config.scan_layers:
    return {name: jnp.zeros((config.num_hidden_layers,) + shape, dtype) for name in ("k", "v")}
  return {name: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
          for name in ("k", "v")}


# ----------------------------------------------------------------------------- layouts

# Contracted (input) axes of each projection's kernel: o_proj reads (heads, head_dim).
_KERNEL_IN_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1,
                   "down_proj": 1, "lm_head": 1, "qkv_proj": 1, "gate_up_proj": 1}


def change_kernel_layout(params: dict, config: LLMConfig, layout: str) -> tuple[LLMConfig, dict]:
  """`params` of `config` re-stored in `layout` (`LLMConfig.kernel_layout`: "in_out", "out_in"
  or "out_in_fused"), scanned or unscanned: (the config with that layout, new params). Kernels
  are transposed, or q / k / v and gate / up joined or split; the values do not change."""
  from flax.core import meta
  if layout not in KERNEL_LAYOUTS:
    raise ValueError(f"kernel_layout must be one of {KERNEL_LAYOUTS}, got {layout!r}")
  if layout == config.kernel_layout:
    return config, params
  params = meta.unbox(params)
  if config.fused_projections:
    params = _map_layers(params, functools.partial(_split_layer, heads=config.num_attention_heads,
                                                   kv_heads=config.num_key_value_heads))
    config = dataclasses.replace(config, kernel_layout="out_in")
  out_first = layout != "in_out"

  def move(path, x):
    names = [str(getattr(k, "key", k)) for k in path]
    if names[-1] != "kernel" or len(names) < 2 or names[-2] not in _KERNEL_IN_AXES:
      return x
    n_in, lead, nd = _KERNEL_IN_AXES[names[-2]], int("layers" in names), np.ndim(x)  # scanned: L first
    if out_first:    # [L?, in..., out...] -> [L?, out..., in...]
      perm = [*range(lead), *range(lead + n_in, nd), *range(lead, lead + n_in)]
    else:            # [L?, out..., in...] -> [L?, in..., out...]
      perm = [*range(lead), *range(nd - n_in, nd), *range(lead, nd - n_in)]
    return jnp.transpose(x, perm) if isinstance(x, jax.Array) else np.ascontiguousarray(np.transpose(x, perm))
  if out_first != config.kernel_out_first:
    params = jax.tree_util.tree_map_with_path(move, params)
  if layout == "out_in_fused":
    params = _map_layers(params, _join_layer)
  return dataclasses.replace(config, kernel_layout=layout), params


def _map_layers(params: dict, fn) -> dict:
  """fn(layer params, lead) on every decoder layer: lead = 1 for the scanned [L, ...] stack."""
  dec = dict(params["decoder"])
  if "layers" in dec:
    dec["layers"] = {"layer": fn(dec["layers"]["layer"], 1)}
  else:
    for name in [n for n in dec if n.startswith("layers_")]:
      dec[name] = fn(dec[name], 0)
  return {**params, "decoder": dec}


def _xp(x):
  return jnp if isinstance(x, jax.Array) else np


def _join_layer(layer: dict, lead: int) -> dict:
  """[out, in] q / k / v -> qkv_proj (heads joined), gate / up -> gate_up_proj (stacked)."""
  attn, mlp = dict(layer["self_attn"]), dict(layer["mlp"])
  parts = [attn.pop(name) for name in ("q_proj", "k_proj", "v_proj")]
  attn["qkv_proj"] = {key: _xp(parts[0][key]).concatenate([p[key] for p in parts], axis=lead)
                      for key in parts[0]}
  gate, up = mlp.pop("gate_proj")["kernel"], mlp.pop("up_proj")["kernel"]
  mlp["gate_up_proj"] = {"kernel": _xp(gate).stack([gate, up], axis=lead)}
  return {**layer, "self_attn": attn, "mlp": mlp}


def _split_layer(layer: dict, lead: int, heads: int, kv_heads: int) -> dict:
  """The inverse of `_join_layer`."""
  attn, mlp = dict(layer["self_attn"]), dict(layer["mlp"])
  at = lambda index: (slice(None),) * lead + (index,)
  qkv = attn.pop("qkv_proj")
  for name, rows in (("q_proj", slice(0, heads)), ("k_proj", slice(heads, heads + kv_heads)),
                     ("v_proj", slice(heads + kv_heads, heads + 2 * kv_heads))):
    attn[name] = {key: x[at(rows)] for key, x in qkv.items()}
  gate_up = mlp.pop("gate_up_proj")["kernel"]
  mlp["gate_proj"], mlp["up_proj"] = {"kernel": gate_up[at(0)]}, {"kernel": gate_up[at(1)]}
  return {**layer, "self_attn": attn, "mlp": mlp}


def stack_layers(params: dict, num_layers: int) -> dict:
  """Unscanned (`decoder/layers_{i}/...`) -> scanned (`decoder/layers/layer/...`, leading L axis)."""
  params = dict(params)
  dec = dict(params["decoder"])
  layers = [dec.pop(f"layers_{i}") for i in range(num_layers)]
  dec["layers"] = {"layer": jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)}
  params["decoder"] = dec
  return params


def unstack_layers(params: dict, num_layers: int) -> dict:
  """Scanned -> unscanned layout (inverse of `stack_layers`, bit-exact)."""
  params = dict(params)
  dec = dict(params["decoder"])
  stacked = dec.pop("layers")["layer"]
  for i in range(num_layers):
    dec[f"layers_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked)
  params["decoder"] = dec
  return params
