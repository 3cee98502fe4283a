"""ChatRex / RexSeek MLLM checkpoints <-> `chatrex_jax.models.chatrex.ChatRex` parameters.

One key map for the whole model, composed of the family maps (LLM, CLIP, ConvNeXt,
projectors). Two layouts are recognised from the checkpoint's keys (docs/architecture.md B.1, E.2):

* "rexseek": multimodal modules at the top level (`vision_tower.*`, `vision_tower_aux.*`,
  `mm_projector.*`, `mm_object_projector.*`) beside the LLM's `model.*` / `lm_head.*`;
* "llava": LLaVA-style, the multimodal modules under `model.` (`model.mm_projector.*`,
  `model.vision_tower.*`, ...), as a Vicuna/LLaMA-based ChatRex-7B may store them.

Sizes come from config.json (LLM) and from the tensors themselves (vision towers, whose
configs an MLLM checkpoint does not carry), so a checkpoint folder is self-describing.
`load(dir)` streams tensor by tensor; `save(params, config, dir)` writes the same layout
back (bit-identical round trip). `save_orbax` / `load_orbax` keep the same params as an Orbax
tree (dir/config.json + dir/params/) for JAX-side storage and sharded restores.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Iterable, Mapping

import numpy as np

from chatrex_jax.convert import clip as clip_convert
from chatrex_jax.convert import convnext as convnext_convert
from chatrex_jax.convert import llm as llm_convert
from chatrex_jax.convert import mapping, safetensors_io
from chatrex_jax.convert import projector as projector_convert
from chatrex_jax.convert.mapping import Rule
from chatrex_jax.models.chatrex import ChatRexConfig

LAYOUT_PREFIX = {"rexseek": "", "llava": "model."}


def detect_layout(keys: Iterable[str]) -> str:
  keys = list(keys)
  if any(k.startswith("model.mm_projector.") for k in keys):
    return "llava"
  if any(k.startswith("mm_projector.") for k in keys):
    return "rexseek"
  raise ValueError("not a ChatRex/RexSeek checkpoint: no `mm_projector.*` (RexSeek layout) or "
                   "`model.mm_projector.*` (LLaVA layout) keys")


def rules(config: ChatRexConfig, layout: str = "rexseek") -> list[Rule]:
  mm = LAYOUT_PREFIX[layout]
  out = llm_convert.rules(config.llm, prefix="", flax_prefix="llm/")
  out += clip_convert.rules(config.clip, prefix=f"{mm}vision_tower.vision_tower.vision_model.",
                            flax_prefix="vision_tower")
  out += convnext_convert.rules(config.convnext, layout="rexseek", prefix=f"{mm}vision_tower_aux.",
                                flax_prefix="vision_tower_aux")
  out += projector_convert.rules(f"{mm}mm_projector.", "mm_projector")
  out += projector_convert.rules(f"{mm}mm_object_projector.", "mm_object_projector")
  return out


def ignore_patterns(config: ChatRexConfig, layout: str) -> list[str]:
  mm = LAYOUT_PREFIX[layout]
  out = list(llm_convert.IGNORED)
  out += clip_convert.ignore_patterns(f"{mm}vision_tower.vision_tower.vision_model.")
  if config.llm.tie_word_embeddings:
    out.append("lm_head.weight")
  return out


# ----------------------------------------------------------------------------- config

def _count(keys, pattern: str) -> int:
  found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
  return max(found) + 1 if found else 0


def config_from_checkpoint(hf: Mapping, specs: Mapping[str, tuple], *, tokenizer_class: str | None = None,
                           **llm_overrides) -> ChatRexConfig:
  """ChatRexConfig from the MLLM config.json and the tensors' shapes {key: shape}; the LLM family
  from config.json, the tensors and the tokenizer class together (`models.llm.infer_family`)."""
  layout = detect_layout(specs)
  mm = LAYOUT_PREFIX[layout]
  vt = f"{mm}vision_tower.vision_tower.vision_model."
  hidden = specs[f"{vt}embeddings.class_embedding"][0]
  patch = specs[f"{vt}embeddings.patch_embedding.weight"]
  positions = specs[f"{vt}embeddings.position_embedding.weight"][0]
  grid = int(round((positions - 1) ** 0.5))
  vision_cfg = dict(hf.get("vision_config") or {})
  clip = dict(
      hidden_size=hidden, intermediate_size=specs[f"{vt}encoder.layers.0.mlp.fc1.weight"][0],
      num_hidden_layers=_count(specs, re.escape(vt) + r"encoder\.layers\.(\d+)\."),
      num_attention_heads=vision_cfg.get("num_attention_heads", max(1, hidden // 64)),
      image_size=grid * patch[-1], patch_size=patch[-1], num_channels=patch[1],
      hidden_act=vision_cfg.get("hidden_act", "quick_gelu"),
      layer_norm_eps=vision_cfg.get("layer_norm_eps", 1e-5),
      select_layer=int(hf.get("mm_vision_select_layer", -2)),
      select_feature=hf.get("mm_vision_select_feature", "patch"))
  aux = f"{mm}vision_tower_aux."
  stages = _count(specs, re.escape(aux) + r"vision_stages\.(\d+)\.")
  stem = specs[f"{aux}vision_stem.0.weight"]
  convnext = dict(
      depths=[_count(specs, re.escape(aux) + rf"vision_stages\.{s}\.blocks\.(\d+)\.") for s in range(stages)],
      dims=[specs[f"{aux}vision_stages.{s}.blocks.0.conv_dw.weight"][0] for s in range(stages)],
      in_chans=stem[1], patch_size=stem[-1],
      kernel_size=specs[f"{aux}vision_stages.0.blocks.0.conv_dw.weight"][-1])
  aux_size = int(hf.get("aux_image_size", grid * stem[-1] * 2 ** (stages - 1)))
  return ChatRexConfig.from_dict(
      dict(llm=hf, clip=clip, convnext=convnext, aux_image_size=aux_size),
      llm_hints=dict(qkv_bias=llm_convert.has_qkv_bias(specs), tokenizer_class=tokenizer_class,
                     **llm_overrides))


def config_to_hf(config: ChatRexConfig) -> dict:
  """The MLLM config.json: the LLM's fields (its own model_type kept, e.g. the release's
  "chatrex") plus the multimodal ones."""
  out = config.llm.to_hf()
  if config.llm.model_type:
    out["model_type"] = config.llm.model_type
  out.update(
      mm_vision_select_layer=config.clip.select_layer, mm_vision_select_feature=config.clip.select_feature,
      mm_projector_type="mlp2x_gelu", aux_image_size=config.aux_image_size,
      vision_config=dict(hidden_size=config.clip.hidden_size, intermediate_size=config.clip.intermediate_size,
                         num_hidden_layers=config.clip.num_hidden_layers,
                         num_attention_heads=config.clip.num_attention_heads,
                         image_size=config.clip.image_size, patch_size=config.clip.patch_size,
                         hidden_act=config.clip.hidden_act, layer_norm_eps=config.clip.layer_norm_eps),
      convnext_config=dict(depths=list(config.convnext.depths), dims=list(config.convnext.dims)))
  return out


def config_to_json(config: ChatRexConfig) -> dict:
  """`config_to_hf` plus every vision-tower size and the LLM family: the config.json of an Orbax
  params dir, self-describing without torch tensors to read shapes from."""
  hf = config_to_hf(config)
  hf["llm_family"] = config.llm.family
  hf["vision_config"].update(num_channels=config.clip.num_channels,
                             select_layer=config.clip.select_layer,
                             select_feature=config.clip.select_feature)
  hf["convnext_config"].update(in_chans=config.convnext.in_chans, patch_size=config.convnext.patch_size,
                               kernel_size=config.convnext.kernel_size)
  return hf


def config_from_json(hf: Mapping) -> ChatRexConfig:
  """Inverse of `config_to_json` (a ValueError when the tower sizes are not there)."""
  if "vision_config" not in hf or "convnext_config" not in hf:
    raise ValueError("config.json lacks vision_config / convnext_config: this is not a params dir "
                     "written by `chatrex-jax convert chatrex --format orbax`")
  llm = {k: v for k, v in hf.items() if k not in ("llm_family", "vision_config", "convnext_config")}
  return ChatRexConfig.from_dict(dict(llm=llm, clip=hf["vision_config"], convnext=hf["convnext_config"],
                                      aux_image_size=int(hf["aux_image_size"]),
                                      llm_family=hf.get("llm_family")))


# ----------------------------------------------------------------------------- conversion

def to_flax(state: Mapping[str, np.ndarray], config: ChatRexConfig, *, layout: str | None = None,
            expected=None, check_shapes: bool = True, strict: bool = True, dtype=None) -> dict:
  """A torch-named state dict (or lazy `Checkpoint`) of either layout -> Flax params, shapes
  checked against `expected` (default: `abstract_params(config)`) unless check_shapes=False."""
  layout = layout or detect_layout(state.keys())
  if expected is None and check_shapes:
    expected = abstract_params(config)
  params = mapping.to_flax(state, rules(config, layout), what=f"ChatRex conversion ({layout} layout)",
                           expected=expected, ignore=ignore_patterns(config, layout), strict=strict,
                           dtype=dtype)
  if config.llm.tie_word_embeddings and "lm_head.weight" in state:
    llm_convert._check_tied(state, config.llm, "")
  if config.llm.scan_layers:
    params["llm"] = llm_convert.stack_layers(params["llm"], config.llm.num_hidden_layers)
  return params


def to_torch(params: Mapping, config: ChatRexConfig, layout: str = "rexseek", dtype=None):
  """Flax params -> (torch key, array) pairs of `layout`, lazily."""
  from flax.core import meta
  params = dict(meta.unbox(params))
  if "layers" in params["llm"].get("decoder", {}):
    params["llm"] = llm_convert.unstack_layers(params["llm"], config.llm.num_hidden_layers)
  return mapping.to_torch(params, rules(config, layout), what="ChatRex export", dtype=dtype)


def read_config(path, **llm_overrides) -> ChatRexConfig:
  """The ChatRexConfig of a checkpoint folder, from config.json and the tensor headers only."""
  path = pathlib.Path(path)
  hf = json.loads((path / "config.json").read_text())
  ckpt = safetensors_io.Checkpoint(path)
  try:
    return config_from_checkpoint(hf, {k: ckpt.spec(k)[1] for k in ckpt},
                                  tokenizer_class=llm_convert.tokenizer_class(path), **llm_overrides)
  finally:
    ckpt.close()


def load(path, *, dtype=None, **llm_overrides) -> tuple[ChatRexConfig, dict, str]:
  """A checkpoint folder (config.json + safetensors [+ index]) -> (config, params, layout)."""
  path = pathlib.Path(path)
  hf = json.loads((path / "config.json").read_text())
  ckpt = safetensors_io.Checkpoint(path)
  try:
    specs = {k: ckpt.spec(k)[1] for k in ckpt}
    config = config_from_checkpoint(hf, specs, tokenizer_class=llm_convert.tokenizer_class(path),
                                    **llm_overrides)
    layout = detect_layout(specs)
    return config, to_flax(ckpt, config, layout=layout, dtype=dtype), layout
  finally:
    ckpt.close()


def save(params: Mapping, config: ChatRexConfig, dst, *, layout: str = "rexseek",
         max_shard_bytes: int = 5 * 2**30, dtype=None, tokenizer=None) -> pathlib.Path:
  """Writes the official layout: config.json, sharded safetensors + index (+ tokenizer files)."""
  dst = pathlib.Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  safetensors_io.save_sharded(to_torch(params, config, layout, dtype), dst, max_shard_bytes)
  (dst / "config.json").write_text(json.dumps(config_to_hf(config), indent=2))
  if tokenizer is not None:
    tokenizer.save_pretrained(dst)
  return dst


# ----------------------------------------------------------------------------- Orbax

ORBAX_PARAMS = "params"   # the sub-folder of an Orbax ChatRex folder that holds the tree


def is_orbax_dir(path) -> bool:
  """Whether `path` is a `save_orbax` folder (config.json + params/)."""
  return (pathlib.Path(path) / ORBAX_PARAMS).is_dir()


def save_orbax(params: Mapping, config: ChatRexConfig, dst) -> pathlib.Path:
  """dst/config.json (`config_to_json`: the official config plus the tower sizes) and
  dst/params/, an Orbax `StandardCheckpointer` tree of the Flax params."""
  import orbax.checkpoint as ocp
  dst = pathlib.Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  (dst / "config.json").write_text(json.dumps(config_to_json(config), indent=2))
  ckptr = ocp.StandardCheckpointer()
  try:
    ckptr.save((dst / ORBAX_PARAMS).absolute(), params)
    ckptr.wait_until_finished()
  finally:
    ckptr.close()
  return dst


def load_orbax(path) -> tuple[ChatRexConfig, dict]:
  """A `save_orbax` folder -> (config, params as numpy arrays), every parameter's presence and
  shape checked against the config (`mapping.check_tree`)."""
  import jax
  import orbax.checkpoint as ocp
  path = pathlib.Path(path)
  config = config_from_json(json.loads((path / "config.json").read_text()))
  ckptr = ocp.StandardCheckpointer()
  try:
    params = jax.tree.map(np.asarray, ckptr.restore((path / ORBAX_PARAMS).absolute()))
  finally:
    ckptr.close()
  mapping.check_tree(params, abstract_params(config), "ChatRex Orbax params")
  return config, params


def abstract_params(config: ChatRexConfig) -> dict:
  """The parameter shapes of `ChatRex(config)` (unboxed `ShapeDtypeStruct`s, no arrays made)."""
  from flax.core import meta
  import jax

  from chatrex_jax.models.chatrex import init_params
  return meta.unbox(jax.eval_shape(lambda: init_params(config, jax.random.key(0)))["params"])


def with_llm_dtype(config: ChatRexConfig, **kw) -> ChatRexConfig:
  return dataclasses.replace(config, llm=dataclasses.replace(config.llm, **kw))
