"""HF CLIP vision tower <-> `chatrex_jax.models.clip_vit.CLIPVisionTower` parameters.

Torch layouts (all handled by `prefix`):
  * HF `CLIPVisionModel` / `CLIPModel`:  `vision_model.*`        (PREFIX_HF)
  * ChatRex / RexSeek MLLM checkpoints:  `vision_tower.vision_tower.vision_model.*` (PREFIX_MLLM)
`rules(config, prefix, flax_prefix)` is the key map (reuse it inside a bigger model by giving
both prefixes); `to_flax` / `to_torch` wrap `chatrex_jax.convert.mapping` (strict: every
missing, unexpected and mis-shaped key reported at once; round trips bit-identical).
Keys that belong to a full `CLIPModel` but not to the vision tower (text tower, projections,
logit scale) and the `position_ids` buffer are ignored explicitly (`ignore_patterns`).
"""
from __future__ import annotations

import pathlib
from typing import Iterable, Mapping

import numpy as np

from chatrex_jax.convert import mapping, torch_files
from chatrex_jax.convert.mapping import CONV2D, Rule
from chatrex_jax.models.clip_vit import CLIPVisionConfig

PREFIX_HF = "vision_model."
PREFIX_MLLM = "vision_tower.vision_tower.vision_model."


def rules(cfg: CLIPVisionConfig, prefix: str = PREFIX_HF, flax_prefix: str = "") -> list[Rule]:
  """Every torch key of the vision tower under `prefix` <-> its Flax path under `flax_prefix`."""
  n = cfg.num_attention_heads
  fp = mapping.flax_scope(flax_prefix)
  out = [
      Rule(f"{prefix}embeddings.patch_embedding.weight", f"{fp}embeddings/patch_embedding", CONV2D),
      Rule(f"{prefix}embeddings.class_embedding", f"{fp}embeddings/class_embedding"),
      Rule(f"{prefix}embeddings.position_embedding.weight", f"{fp}embeddings/position_embedding"),
  ]
  out += mapping.norm_rules(f"{prefix}pre_layrnorm", f"{fp}pre_layrnorm")
  # post_layernorm only makes the pooled CLS output, which the MLLM never reads (it takes
  # hidden_states[select_layer] patches): LLaVA-style towers may be saved without it.
  d = cfg.hidden_size
  out += [Rule(f"{prefix}post_layernorm.weight", f"{fp}post_layernorm/scale",
               fill_if_missing=lambda: np.ones((d,), np.float32)),
          Rule(f"{prefix}post_layernorm.bias", f"{fp}post_layernorm/bias",
               fill_if_missing=lambda: np.zeros((d,), np.float32))]
  for i in range(cfg.num_hidden_layers):
    t, f = f"{prefix}encoder.layers.{i}.", f"{fp}layers_{i}/"
    for proj in ("q_proj", "k_proj", "v_proj"):
      out += mapping.linear_rules(f"{t}self_attn.{proj}", f"{f}self_attn/{proj}",
                                  layout=mapping.linear_to_heads(n), bias_layout=mapping.bias_to_heads(n))
    out += mapping.linear_rules(f"{t}self_attn.out_proj", f"{f}self_attn/out_proj",
                                layout=mapping.heads_to_linear(n))
    for ln in ("layer_norm1", "layer_norm2"):
      out += mapping.norm_rules(f"{t}{ln}", f"{f}{ln}")
    for fc in ("fc1", "fc2"):
      out += mapping.linear_rules(f"{t}mlp.{fc}", f"{f}{fc}")
  return out


def ignore_patterns(prefix: str = PREFIX_HF) -> list[str]:
  """Torch keys that may accompany the tower and carry nothing it needs."""
  root = prefix[:-len("vision_model.")] if prefix.endswith("vision_model.") else prefix
  return [f"{prefix}embeddings.position_ids",          # buffer in older transformers
          f"{root}text_model.*", f"{root}visual_projection.*", f"{root}text_projection.*",
          f"{root}logit_scale", f"{root}logit_bias"]


def detect_prefix(keys: Iterable[str]) -> str:
  """The prefix of the vision tower in a state dict (MLLM, HF, or bare 'embeddings.*')."""
  keys = list(keys)
  for p in (PREFIX_MLLM, PREFIX_HF):
    if any(k.startswith(p + "embeddings.") for k in keys):
      return p
  if any(k.startswith("embeddings.patch_embedding") for k in keys):
    return ""
  raise ValueError("no CLIP vision tower found: expected keys like "
                   f"'{PREFIX_HF}embeddings.patch_embedding.weight' or '{PREFIX_MLLM}...'")


def abstract_params(cfg: CLIPVisionConfig) -> dict:
  """The parameter shapes of `CLIPVisionTower(cfg)`: traced, no arrays made."""
  from flax.core import meta
  import jax
  import jax.numpy as jnp

  from chatrex_jax.models.clip_vit import CLIPVisionTower
  pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  return meta.unbox(jax.eval_shape(CLIPVisionTower(cfg).init, jax.random.key(0), pixels)["params"])


def to_flax(state: Mapping[str, np.ndarray], cfg: CLIPVisionConfig, *, prefix: str | None = None,
            expected: Mapping | None = None, check_shapes: bool = True, strict: bool = True,
            dtype=None, extra_ignore: Iterable[str] = ()) -> dict:
  """torch state dict -> Flax params of `CLIPVisionTower(cfg)` (prefix auto-detected if None).

  strict=True reports every key under the state dict that no rule or ignore pattern covers;
  shapes are checked against `expected` (default `abstract_params(cfg)`) unless check_shapes=False.
  """
  prefix = detect_prefix(state.keys()) if prefix is None else prefix
  if expected is None and check_shapes:
    expected = abstract_params(cfg)
  return mapping.to_flax(state, rules(cfg, prefix), what=f"CLIP vision ({prefix or 'bare'})",
                         expected=expected, ignore=ignore_patterns(prefix) + list(extra_ignore),
                         dtype=dtype, strict=strict)


def to_torch(params: Mapping, cfg: CLIPVisionConfig, *, prefix: str = PREFIX_HF,
             dtype=None) -> dict[str, np.ndarray]:
  """Flax params -> torch state dict (HF names under `prefix`)."""
  return dict(mapping.to_torch(params, rules(cfg, prefix), what="CLIP vision", dtype=dtype))


def load(path, cfg: CLIPVisionConfig, **kw) -> dict:
  """A checkpoint file or HF folder (`torch_files.read_state`) -> Flax params (`to_flax`'s
  options; the prefix is detected when not given)."""
  return torch_files.convert_file(path, lambda state: to_flax(state, cfg, **kw))


def save(params: Mapping, cfg: CLIPVisionConfig, path, **kw) -> pathlib.Path:
  """Flax params -> one safetensors file with the torch names (`to_torch`'s options)."""
  return torch_files.write_safetensors(to_torch(params, cfg, **kw), path)
