"""HF Qwen2 / LLaMA checkpoints <-> `chatrex_jax.models.llm.CausalLM` parameters.

The key map is declarative (`rules`); the generic engine in `mapping.py` applies it. Three
entry points cover the workflows:

* `load(path, config)`: HF checkpoint folder (sharded safetensors + index) -> Flax tree,
  streaming tensor by tensor (peak host memory: the result plus one tensor).
* `convert_hf_to_flax_checkpoint(src, dst)`: disk to disk, streaming (peak: one output
  shard plus one tensor) - for checkpoints larger than host memory.
* `save(params, config, dst)`: Flax tree -> HF folder (`config.json` + safetensors) that
  `AutoModelForCausalLM.from_pretrained(dst)` loads.

`prefix` relocates the LLM inside a larger checkpoint (e.g. "" for ChatRex/RexSeek, whose
LLM keys are `model.*` and `lm_head.*` at the top level).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Iterator, Mapping

import numpy as np

from chatrex_jax.convert import mapping, safetensors_io
from chatrex_jax.convert.mapping import IDENTITY, LINEAR, Rule
from chatrex_jax.models.llm import LLMConfig, change_kernel_layout, stack_layers, unstack_layers

# Buffers some checkpoints carry that are recomputed here.
IGNORED = ("*.rotary_emb.inv_freq",)


def rules(config: LLMConfig, prefix: str = "", flax_prefix: str = "") -> list[Rule]:
  """torch key <-> Flax path for the unscanned layout (`decoder/layers_{i}/...`)."""
  n, k = config.num_attention_heads, config.num_key_value_heads
  t, f = prefix, flax_prefix
  if config.fused_projections:
    raise ValueError("the key map is for separate q / k / v and gate / up kernels: convert with "
                     "kernel_layout='out_in', then models.llm.change_kernel_layout(..., 'out_in_fused') "
                     "(to_flax / to_torch / load / save do this themselves)")
  if config.kernel_out_first:   # torch's own layout: reshapes only
    to_heads, from_heads, linear = mapping.rows_to_heads, mapping.cols_to_heads, IDENTITY
  else:
    to_heads, from_heads, linear = mapping.linear_to_heads, mapping.heads_to_linear, LINEAR
  template = [
      ("model.layers.{i}.self_attn.q_proj.weight", "decoder/layers_{i}/self_attn/q_proj/kernel", to_heads(n)),
      ("model.layers.{i}.self_attn.k_proj.weight", "decoder/layers_{i}/self_attn/k_proj/kernel", to_heads(k)),
      ("model.layers.{i}.self_attn.v_proj.weight", "decoder/layers_{i}/self_attn/v_proj/kernel", to_heads(k)),
      ("model.layers.{i}.self_attn.o_proj.weight", "decoder/layers_{i}/self_attn/o_proj/kernel", from_heads(n)),
      ("model.layers.{i}.mlp.gate_proj.weight", "decoder/layers_{i}/mlp/gate_proj/kernel", linear),
      ("model.layers.{i}.mlp.up_proj.weight", "decoder/layers_{i}/mlp/up_proj/kernel", linear),
      ("model.layers.{i}.mlp.down_proj.weight", "decoder/layers_{i}/mlp/down_proj/kernel", linear),
      ("model.layers.{i}.input_layernorm.weight", "decoder/layers_{i}/input_layernorm/scale", IDENTITY),
      ("model.layers.{i}.post_attention_layernorm.weight", "decoder/layers_{i}/post_attention_layernorm/scale", IDENTITY),
  ]
  if config.attention_bias:
    template += [
        ("model.layers.{i}.self_attn.q_proj.bias", "decoder/layers_{i}/self_attn/q_proj/bias", mapping.bias_to_heads(n)),
        ("model.layers.{i}.self_attn.k_proj.bias", "decoder/layers_{i}/self_attn/k_proj/bias", mapping.bias_to_heads(k)),
        ("model.layers.{i}.self_attn.v_proj.bias", "decoder/layers_{i}/self_attn/v_proj/bias", mapping.bias_to_heads(k)),
    ]
  template += [
      ("model.embed_tokens.weight", "embed_tokens/embedding", IDENTITY),
      ("model.norm.weight", "decoder/norm/scale", IDENTITY),
  ]
  if not config.tie_word_embeddings:
    template.append(("lm_head.weight", "lm_head/kernel", linear))
  out = mapping.expand(template, i=config.num_hidden_layers)
  return [Rule(t + r.torch_key, f + r.flax_path, r.layout, tuple(t + a for a in r.aliases)) for r in out]


def _check_tied(state: Mapping[str, np.ndarray], config: LLMConfig, prefix: str):
  """A tied checkpoint may still store lm_head.weight; it must equal the embedding."""
  key = prefix + "lm_head.weight"
  if config.tie_word_embeddings and key in state:
    if not np.array_equal(np.asarray(state[key]), np.asarray(state[prefix + "model.embed_tokens.weight"])):
      raise mapping.ConversionError(
          "LLM conversion", other=[f"tie_word_embeddings=true but {key} differs from the embedding: "
                                   "set tie_word_embeddings=false in config.json"])


def abstract_params(config: LLMConfig) -> dict:
  """The (unscanned) parameter shapes of `CausalLM(config)`: traced, no arrays made."""
  from flax.core import meta
  import jax
  import jax.numpy as jnp

  from chatrex_jax.models.llm import CausalLM
  model = CausalLM(dataclasses.replace(config, scan_layers=False))
  return meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])


def to_flax(state: Mapping[str, np.ndarray], config: LLMConfig, *, expected=None,
            check_shapes: bool = True, prefix: str = "", strict: bool = True, dtype=None) -> dict:
  """A torch-named state dict (or lazy `Checkpoint`) -> Flax params (layout per config.scan_layers).

  Shapes are checked against `expected` (default: `abstract_params(config)`) unless
  check_shapes=False."""
  if config.fused_projections:   # the checkpoint's separate kernels, joined afterwards
    separate = dataclasses.replace(config, kernel_layout="out_in")
    if expected is not None:   # the joined kernels' shapes, as the separate ones'
      from flax.core import meta
      import jax
      expected = jax.eval_shape(lambda e: change_kernel_layout(e, config, "out_in")[1], meta.unbox(expected))
    params = to_flax(state, separate, expected=expected, check_shapes=check_shapes, prefix=prefix,
                     strict=strict, dtype=dtype)
    return change_kernel_layout(params, separate, config.kernel_layout)[1]
  _check_tied(state, config, prefix)
  ignore = IGNORED + ((prefix + "lm_head.weight",) if config.tie_word_embeddings else ())
  if expected is None and check_shapes:
    expected = abstract_params(config)
  elif expected is not None and config.scan_layers:
    expected = None  # a scanned tree's shapes: checked on the unscanned tree below
  params = mapping.to_flax(state, rules(config, prefix), what="LLM conversion", expected=expected,
                           ignore=ignore, strict=strict, dtype=dtype)
  return stack_layers(params, config.num_hidden_layers) if config.scan_layers else params


def to_torch(params: Mapping, config: LLMConfig, prefix: str = "",
                   dtype=None) -> Iterator[tuple[str, np.ndarray]]:
  """Flax params -> (torch key, array) pairs, lazily, in HF order."""
  from flax.core import meta
  params = meta.unbox(params)
  if config.fused_projections:
    config, params = change_kernel_layout(params, config, "out_in")
  if config.scan_layers or "layers" in params.get("decoder", {}):
    params = unstack_layers(params, config.num_hidden_layers)
  return mapping.to_torch(params, rules(config, prefix), what="LLM export", dtype=dtype)


def read_hf_config(path) -> dict:
  path = pathlib.Path(path)
  cfg_path = path / "config.json" if path.is_dir() else path.parent / "config.json"
  if not cfg_path.exists():
    raise FileNotFoundError(f"{cfg_path} not found: a HF checkpoint folder needs its config.json")
  hf = json.loads(cfg_path.read_text())
  # LLaVA-style multimodal configs nest the LLM config.
  return hf.get("text_config", hf) if "text_config" in hf and "hidden_size" not in hf else hf


def tokenizer_class(path) -> str | None:
  """tokenizer_config.json's `tokenizer_class` in a checkpoint folder (None if absent)."""
  path = pathlib.Path(path)
  f = (path if path.is_dir() else path.parent) / "tokenizer_config.json"
  if not f.exists():
    return None
  return json.loads(f.read_text()).get("tokenizer_class")


def has_qkv_bias(keys, prefix: str = "") -> bool:
  """Whether a state dict's keys hold the LLM's q/k/v bias tensors (Qwen2 does, LLaMA not)."""
  return f"{prefix}model.layers.0.self_attn.q_proj.bias" in set(keys)


def config_from_folder(path, ckpt=None, **overrides) -> LLMConfig:
  """LLMConfig of a HF folder, the family decided by config.json, the tensors and the
  tokenizer together (`models.llm.infer_family`)."""
  own = ckpt is None
  ckpt = safetensors_io.Checkpoint(path) if own else ckpt
  try:
    return LLMConfig.from_hf(read_hf_config(path), qkv_bias=has_qkv_bias(ckpt),
                             tokenizer_class=tokenizer_class(path), **overrides)
  finally:
    if own:
      ckpt.close()


def load(path, config: LLMConfig | None = None, *, prefix: str = "", dtype=None, **overrides):
  """Loads a HF checkpoint folder -> (config, params), streaming tensor by tensor."""
  ckpt = safetensors_io.Checkpoint(path)
  if config is None:
    config = config_from_folder(path, ckpt, **overrides)
  try:
    return config, to_flax(ckpt, config, prefix=prefix, dtype=dtype)
  finally:
    ckpt.close()


def save(params: Mapping, config: LLMConfig, dst, *, max_shard_bytes: int = 5 * 2**30,
            dtype=None) -> pathlib.Path:
  """Writes an HF checkpoint folder (config.json + safetensors shards + index)."""
  dst = pathlib.Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  safetensors_io.save_sharded(to_torch(params, config, dtype=dtype), dst, max_shard_bytes)
  (dst / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
  return dst


def convert_hf_to_flax_checkpoint(src, dst, config: LLMConfig | None = None, *,
                                  max_shard_bytes: int = 2 * 2**30, prefix: str = "") -> pathlib.Path:
  """Disk-to-disk conversion: HF safetensors -> safetensors keyed by Flax paths ('a/b/c').

  Streams: each tensor is read, transformed and appended to the current output shard, so
  the peak host memory is about one output shard, whatever the checkpoint size. Load the
  result with `load_flax_checkpoint` (optionally straight onto sharded devices).
  """
  ckpt = safetensors_io.Checkpoint(src)
  if config is None:
    config = config_from_folder(src, ckpt)
  _check_tied(ckpt, config, prefix)
  the_rules = rules(config, prefix)
  ignore = IGNORED + ((prefix + "lm_head.weight",) if config.tie_word_embeddings else ())
  missing = [r.torch_key for r in the_rules if not any(k in ckpt for k in r.torch_keys)]
  unexpected = mapping.unused_keys(ckpt, the_rules, ignore)
  if missing or unexpected:
    raise mapping.ConversionError("LLM conversion", missing, unexpected)

  def tensors():
    for r in the_rules:
      key = next(k for k in r.torch_keys if k in ckpt)
      yield r.flax_path, r.layout.to_flax(ckpt[key])
  dst = pathlib.Path(dst)
  safetensors_io.save_sharded(tensors(), dst, max_shard_bytes, metadata={"format": mapping.FLAX_FORMAT})
  (dst / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
  ckpt.close()
  return dst


def load_flax_checkpoint(path, shardings=None) -> dict:
  """Reads a `convert_hf_to_flax_checkpoint` folder -> params (unscanned layout).

  shardings: optional pytree (same structure) of `jax.sharding.Sharding`; each tensor is then
  placed on devices as soon as it is read, so the host holds one tensor at a time.
  """
  import jax
  ckpt = safetensors_io.Checkpoint(path)
  flat_shardings = mapping.flatten(shardings) if shardings is not None else {}
  out = {}
  for name in ckpt:
    value = ckpt[name]
    out[name] = jax.device_put(value, flat_shardings[name]) if name in flat_shardings else value
  ckpt.close()
  return mapping.unflatten(out)
