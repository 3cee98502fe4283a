"""UPN checkpoint conversion: official `upn_large.pth` layout (docs/architecture.md A.11) <-> Flax params.

* The shared box MLP appears in the torch state dict under 2 * dec_layers names
  (`bbox_embed.{i}` and `transformer.decoder.bbox_embed.{i}`): one Flax copy, the others are
  `Rule.aliases` (checked equal on read, all written back).
* `relative_position_index` buffers are checked against the index this project rebuilds and
  not stored in the params; `to_torch` writes them back (int64) so round trips are identical.
* The official load is `strict=False`: keys no rule uses (training extras) are returned in a
  `LoadReport`, not an error; a missing parameter is an error.
* Verbs: `rules`, `to_flax`, `to_torch`, `load` / `save` (official file: `.pth` as
  `{"model": state_dict}` like upn_large.pth, or `.safetensors`), and `load_flax` /
  `save_flax` for this project's own file (safetensors keyed by Flax paths).
* `.pth` files are read only through `torch.load(path, weights_only=True, map_location="cpu")`
  (never a full unpickle); `.safetensors` through this project's reader.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Iterable, Mapping

import numpy as np

from chatrex_jax.convert import mapping, torch_files
from chatrex_jax.convert.mapping import (
  IDENTITY,
  LINEAR,
  ConversionError,
  Rule,
  conv_rules,
  linear_rules,
  mlp_rules,
  norm_rules,
)
from chatrex_jax.models.upn.swin import relative_position_index
from chatrex_jax.models.upn.upn import UPNConfig

BACKBONE = "backbone.model.backbone."
BUFFER_PATTERN = "*.attn.relative_position_index"


def _zero_filled(rules_: list[Rule], shapes: Mapping[str, tuple]) -> list[Rule]:
  """The same rules, zero-filled when absent (parameters the forward multiplies by 0)."""
  return [dataclasses.replace(r, fill_if_missing=lambda s=shapes[r.flax_path]: np.zeros(s, np.float32))
          for r in rules_]


def msdeform_attn_rules(torch_prefix: str = "", flax_prefix: str = "") -> list[Rule]:
  """Rules of one MSDeformAttn (`sampling_offsets`, `attention_weights`, `value_proj`, `output_proj`)."""
  tp = f"{torch_prefix}." if torch_prefix else ""
  fp = f"{flax_prefix}/" if flax_prefix else ""
  return [r for n in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
          for r in linear_rules(f"{tp}{n}", f"{fp}{n}")]


def swin_rules(config, torch_prefix: str = BACKBONE, flax_prefix: str = "backbone") -> list[Rule]:
  """Rules of the Swin backbone (buffers excluded); config: SwinConfig."""
  t, f = torch_prefix, flax_prefix
  rules = conv_rules(f"{t}patch_embed.proj", f"{f}/patch_embed/proj") + norm_rules(
      f"{t}patch_embed.norm", f"{f}/patch_embed/norm")
  for i, depth in enumerate(config.depths):
    for j in range(depth):
      tb, fb = f"{t}layers.{i}.blocks.{j}", f"{f}/layers_{i}_blocks_{j}"
      rules += norm_rules(f"{tb}.norm1", f"{fb}/norm1") + norm_rules(f"{tb}.norm2", f"{fb}/norm2")
      rules.append(Rule(f"{tb}.attn.relative_position_bias_table",
                        f"{fb}/attn/relative_position_bias_table"))
      rules += linear_rules(f"{tb}.attn.qkv", f"{fb}/attn/qkv", bias=config.qkv_bias)
      rules += linear_rules(f"{tb}.attn.proj", f"{fb}/attn/proj")
      rules += linear_rules(f"{tb}.mlp.fc1", f"{fb}/mlp/fc1") + linear_rules(f"{tb}.mlp.fc2", f"{fb}/mlp/fc2")
    if i < len(config.depths) - 1:
      rules += norm_rules(f"{t}layers.{i}.downsample.norm", f"{f}/layers_{i}_downsample/norm")
      rules += linear_rules(f"{t}layers.{i}.downsample.reduction", f"{f}/layers_{i}_downsample/reduction",
                            bias=False)
  for i in config.out_indices:
    rules += norm_rules(f"{t}norm{i}", f"{f}/norm{i}")
  return rules


def swin_buffers(config, torch_prefix: str = BACKBONE) -> dict[str, np.ndarray]:
  """The `relative_position_index` buffers the official Swin saves in its state dict."""
  index = relative_position_index(config.window_size)
  return {f"{torch_prefix}layers.{i}.blocks.{j}.attn.relative_position_index": index
          for i, depth in enumerate(config.depths) for j in range(depth)}


def rules(config: UPNConfig) -> list[Rule]:
  """The full torch <-> Flax key map of UPN."""
  out = swin_rules(config.swin)
  for lvl in range(config.num_feature_levels):
    out += conv_rules(f"input_proj.{lvl}.0", f"input_proj_{lvl}/conv")
    out += norm_rules(f"input_proj.{lvl}.1", f"input_proj_{lvl}/norm")
  t = "transformer."
  out += [Rule(f"{t}level_embed", "level_embed"), Rule(f"{t}tgt_embed.weight", "tgt_embed"),
          Rule(f"{t}fine_grained_prompt.weight", "fine_grained_prompt"),
          Rule(f"{t}coarse_grained_prompt.weight", "coarse_grained_prompt")]
  out += linear_rules(f"{t}enc_output", "enc_output") + norm_rules(f"{t}enc_output_norm", "enc_output_norm")
  out += mlp_rules(f"{t}enc_out_bbox_embed", "enc_out_bbox_embed", 3)
  for i in range(config.enc_layers):
    tl, fl = f"{t}encoder.layers.{i}", f"encoder/layers_{i}"
    out += msdeform_attn_rules(f"{tl}.self_attn", f"{fl}/self_attn")
    out += norm_rules(f"{tl}.norm1", f"{fl}/norm1") + norm_rules(f"{tl}.norm2", f"{fl}/norm2")
    out += linear_rules(f"{tl}.linear1", f"{fl}/linear1") + linear_rules(f"{tl}.linear2", f"{fl}/linear2")
  for i in range(config.dec_layers):
    tl, fl = f"{t}decoder.layers.{i}", f"decoder/layers_{i}"
    out += msdeform_attn_rules(f"{tl}.cross_attn", f"{fl}/cross_attn")
    out += [Rule(f"{tl}.self_attn.in_proj_weight", f"{fl}/self_attn/in_proj_kernel", LINEAR),
            Rule(f"{tl}.self_attn.in_proj_bias", f"{fl}/self_attn/in_proj_bias")]
    out += linear_rules(f"{tl}.self_attn.out_proj", f"{fl}/self_attn/out_proj")
    for n in ("norm1", "norm2", "norm3"):
      out += norm_rules(f"{tl}.{n}", f"{fl}/{n}")
    out += linear_rules(f"{tl}.linear1", f"{fl}/linear1") + linear_rules(f"{tl}.linear2", f"{fl}/linear2")
  out += norm_rules(f"{t}decoder.norm", "decoder/norm")
  out += mlp_rules(f"{t}decoder.ref_point_head", "decoder/ref_point_head", 2)
  # The decoder adds 0 * ref_point_head_point(zeros): a checkpoint may lack these weights.
  d = config.d_model
  out += _zero_filled(mlp_rules(f"{t}decoder.ref_point_head_point", "decoder/ref_point_head_point", 2), {
      f"decoder/ref_point_head_point/layers_{k}/{p}": ((d, d) if p == "kernel" else (d,))
      for k in range(2) for p in ("kernel", "bias")})
  # The shared box MLP: one tensor under 2 * dec_layers names.
  for k in range(3):
    for p, layout in (("weight", LINEAR), ("bias", IDENTITY)):
      names = [f"bbox_embed.{i}.layers.{k}.{p}" for i in range(config.dec_layers)]
      names += [f"{t}decoder.bbox_embed.{i}.layers.{k}.{p}" for i in range(config.dec_layers)]
      out.append(Rule(names[0], f"bbox_embed/layers_{k}/{'kernel' if p == 'weight' else 'bias'}",
                      layout, aliases=tuple(names[1:])))
  return out


@dataclasses.dataclass
class LoadReport:
  """What a non-strict load skipped: unused checkpoint keys, absent aliases of shared tensors,
  absent parameters the forward never reads (zero-filled), and the file's top-level entries
  besides the state dict (training extras such as "optimizer" or "epoch")."""
  unexpected: list[str]
  missing_aliases: list[str]
  filled: list[str] = dataclasses.field(default_factory=list)
  extras: list[str] = dataclasses.field(default_factory=list)

  def __str__(self):
    return (f"{len(self.unexpected)} unused checkpoint keys"
            + (f" (e.g. {self.unexpected[:5]})" if self.unexpected else "")
            + f", {len(self.missing_aliases)} absent aliases of shared tensors"
            + (f", {len(self.filled)} absent unused parameters zero-filled ({self.filled})"
               if self.filled else "")
            + (f", entries besides the state dict ignored: {self.extras}" if self.extras else ""))


def abstract_params(config: UPNConfig):
  """Parameter shapes of the Flax model (traced, nothing computed)."""
  import jax
  import jax.numpy as jnp

  from chatrex_jax.models.upn.upn import UPN
  side = 32 * max(8, int(np.ceil(np.sqrt(config.num_queries))))  # enough tokens for top-k
  shapes = jax.eval_shape(lambda: UPN(config).init(
      jax.random.PRNGKey(0), jnp.zeros((1, side, side, 3), jnp.float32), None, "fine"))
  return shapes["params"]


def check_buffers(state: Mapping[str, np.ndarray], config: UPNConfig) -> None:
  """Every saved relative_position_index must equal the rebuilt one (else wrong window size)."""
  bad = []
  for key, want in swin_buffers(config.swin).items():
    if key in state:
      got = np.asarray(state[key])
      if got.shape != want.shape or not np.array_equal(got, want):
        bad.append(f"{key}: saved buffer {got.shape} differs from the index for window "
                   f"{config.swin.window_size}")
  if bad:
    raise ConversionError("UPN relative_position_index", other=bad)


def to_flax(state: Mapping[str, np.ndarray], config: UPNConfig, *, strict: bool = True,
            check_shapes: bool = True, dtype=None) -> tuple[dict, LoadReport]:
  """torch-named UPN state dict -> (Flax params, LoadReport).

  Strict like every family's `to_flax`; strict=False mirrors the official
  `load_state_dict(strict=False)` (what `load` does by default): unused keys are reported in
  the LoadReport. Missing or mis-shaped parameters always raise ConversionError.
  """
  check_buffers(state, config)
  rs = rules(config)
  expected = abstract_params(config) if check_shapes else None
  filled: list[str] = []
  params = mapping.to_flax(state, rs, what="UPN", expected=expected, ignore=(BUFFER_PATTERN,),
                           strict=strict, dtype=dtype, filled=filled)
  unexpected = sorted(mapping.unused_keys(state, rs, (BUFFER_PATTERN,)))
  missing_aliases = sorted(a for r in rs for a in r.aliases if a not in state)
  return params, LoadReport(unexpected, missing_aliases, filled)


def to_torch(params: Mapping, config: UPNConfig, *, with_buffers: bool = True) -> dict[str, np.ndarray]:
  """Flax params -> torch-named state dict (every alias and, by default, the Swin buffers)."""
  out = dict(mapping.to_torch(params, rules(config), what="UPN"))
  if with_buffers:
    out.update(swin_buffers(config.swin))
  return out


def load(path, config: UPNConfig | None = None, *, dtype=None, strict: bool = False,
         safe_globals: Iterable[str] = ()) -> tuple[dict, LoadReport]:
  """Official checkpoint file -> (Flax params, LoadReport). config defaults to UPN-Large.

  Not strict by default, as the official loader: released files carry training extras,
  which the LoadReport names (`to_flax`)."""
  state, extras = torch_files.read_checkpoint(path, safe_globals=safe_globals)
  params, report = to_flax(state, config or UPNConfig(), dtype=dtype, strict=strict)
  report.extras = extras
  return params, report


def official_format(path) -> str:
  """'pth' or 'safetensors', from an official UPN file name (ValueError for anything else)."""
  suffix = pathlib.Path(path).suffix
  if suffix in (".pth", ".pt"):
    return "pth"
  if suffix == ".safetensors":
    return "safetensors"
  raise ValueError(f"{path}: expected a .pth/.pt or .safetensors file name")


def save_state(state: Mapping[str, np.ndarray], path) -> pathlib.Path:
  """A torch-named state dict -> `.pth` ({"model": state}, as upn_large.pth, which the
  official loader reads) or `.safetensors`, chosen by the file name."""
  from chatrex_jax.convert import safetensors_io
  path = pathlib.Path(path)
  kind = official_format(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if kind == "safetensors":
    safetensors_io.save_file(state, path)
    return path
  import ml_dtypes
  import torch

  def tensor(v):
    v = np.asarray(v)
    if v.dtype == ml_dtypes.bfloat16:  # numpy has no bf16: move the bits
      return torch.from_numpy(v.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(v if v.flags.writeable and v.flags.c_contiguous else np.array(v))
  torch.save({"model": {k: tensor(v) for k, v in state.items()}}, path)
  return path


def save(params: Mapping, config: UPNConfig, path) -> pathlib.Path:
  """Flax params -> an official checkpoint file (`save_state` of `to_torch`, buffers included)."""
  return save_state(to_torch(params, config), path)


def is_flax_file(path) -> bool:
  """Whether a .safetensors file is `save_flax`'s (format tag, or keys that are Flax paths)."""
  from chatrex_jax.convert import safetensors_io
  if pathlib.Path(path).suffix != ".safetensors":
    return False
  header = safetensors_io.SafetensorsFile(path)
  try:
    return header.metadata.get("format") == mapping.FLAX_FORMAT or mapping.is_flax_keyed(header)
  finally:
    header.close()


def save_flax(params: Mapping, path) -> pathlib.Path:
  """Flax params -> one safetensors file keyed by Flax paths (format tag `mapping.FLAX_FORMAT`)."""
  from chatrex_jax.convert import safetensors_io
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  safetensors_io.save_file(mapping.flatten(params), path,
                           metadata={"format": mapping.FLAX_FORMAT, "model": "upn"})
  return path


def load_flax(path, config: UPNConfig | None = None) -> dict:
  """A `save_flax` file -> Flax params; with `config`, every path and shape is checked."""
  from chatrex_jax.convert import safetensors_io
  params = mapping.unflatten(safetensors_io.load_file(path))
  if config is not None:
    mapping.check_tree(params, abstract_params(config), f"UPN file {path}")
  return params


def unused(keys: Iterable[str], config: UPNConfig) -> list[str]:
  """Keys of a state dict that no rule (and no buffer) accounts for."""
  return mapping.unused_keys(keys, rules(config), (BUFFER_PATTERN,))
