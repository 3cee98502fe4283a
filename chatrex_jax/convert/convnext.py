"""ConvNeXt checkpoints <-> `chatrex_jax.models.convnext.ConvNeXt` parameters.

Layouts (`LAYOUTS[name]` = stem, stages, layer-scale names, default prefix, ignored extras):
  * "rexseek":   RexSeek `ConvNextVisionEncoder` (`vision_stem.{0,1}`, `vision_stages.{s}`,
                 layer scale `ramma`); inside the MLLM the prefix is `vision_tower_aux.`
                 (PREFIX_MLLM), the standalone fixture has none.
  * "timm":      timm `convnext_*` (`stem.{0,1}`, `stages.{s}`, `gamma`); the classifier
                 `head.*` and `norm_pre.*` are ignored explicitly.
  * "open_clip": open_clip `convnext_large_d_320` etc.: the timm trunk under `visual.trunk.`;
                 `visual.trunk.head.*`, the projection head `visual.head.*` and the text
                 tower / logit scale of a full CLIP checkpoint are ignored explicitly.
Block keys: `blocks.{b}.conv_dw.{weight,bias}`, `norm`, `mlp.fc1`, `mlp.fc2`, layer scale;
downsample: `downsample.0` (LayerNorm2d) and `downsample.1` (Conv k2 s2) for stages > 0.
Strict: every missing, unexpected or mis-shaped key is reported at once; round trips are
bit-identical.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Iterable, Mapping

import numpy as np

from chatrex_jax.convert import mapping, torch_files
from chatrex_jax.convert.mapping import Rule
from chatrex_jax.models.convnext import ConvNeXtConfig

PREFIX_MLLM = "vision_tower_aux."

# Keys of a full open_clip CLIP checkpoint outside the image trunk (text tower, logit scale).
_OPEN_CLIP_TEXT = ["transformer.*", "token_embedding.*", "positional_embedding", "ln_final.*",
                   "text_projection", "text_projection.*", "logit_scale", "logit_bias",
                   "attn_mask", "text.*"]


@dataclasses.dataclass(frozen=True)
class TorchLayout:
  stem: str
  stages: str
  layer_scale: str
  default_prefix: str
  ignore: tuple[str, ...]  # patterns relative to the prefix


LAYOUTS = {
    "rexseek": TorchLayout("vision_stem", "vision_stages", "ramma", "", ()),
    "timm": TorchLayout("stem", "stages", "gamma", "", ("head.*", "norm_pre.*")),
    "open_clip": TorchLayout("stem", "stages", "gamma", "visual.trunk.", ("head.*", "norm_pre.*")),
}


def _layout(name: str) -> TorchLayout:
  if name not in LAYOUTS:
    raise ValueError(f"unknown ConvNeXt layout {name!r} (one of {sorted(LAYOUTS)})")
  return LAYOUTS[name]


def rules(cfg: ConvNeXtConfig, layout: str = "rexseek", prefix: str | None = None,
          flax_prefix: str = "") -> list[Rule]:
  """Every torch key of the trunk <-> its Flax path (under `flax_prefix`)."""
  lay = _layout(layout)
  p = lay.default_prefix if prefix is None else prefix
  fp = mapping.flax_scope(flax_prefix)
  out = mapping.conv_rules(f"{p}{lay.stem}.0", f"{fp}stem_conv")
  out += mapping.norm_rules(f"{p}{lay.stem}.1", f"{fp}stem_norm")
  for s, depth in enumerate(cfg.depths):
    t, f = f"{p}{lay.stages}.{s}.", f"{fp}stages_{s}/"
    if s > 0:
      out += mapping.norm_rules(f"{t}downsample.0", f"{f}downsample_norm")
      out += mapping.conv_rules(f"{t}downsample.1", f"{f}downsample_conv")
    for b in range(depth):
      tb, fb = f"{t}blocks.{b}.", f"{f}blocks_{b}/"
      out += mapping.conv_rules(f"{tb}conv_dw", f"{fb}conv_dw")
      out += mapping.norm_rules(f"{tb}norm", f"{fb}norm")
      for fc in ("fc1", "fc2"):
        out += mapping.linear_rules(f"{tb}mlp.{fc}", f"{fb}{fc}")
      if cfg.ls_init_value is not None:
        out.append(Rule(f"{tb}{lay.layer_scale}", f"{fb}layer_scale"))
  return out


def ignore_patterns(layout: str = "rexseek", prefix: str | None = None) -> list[str]:
  """Torch keys that may accompany the trunk and carry nothing it needs (explicit, per layout).

  open_clip: the trunk's classifier head, the projection head beside the trunk
  (`<root>head.*`, root = prefix without `trunk.`) and, for a whole CLIP checkpoint (root
  `visual.`), the text tower and logit scale.
  """
  lay = _layout(layout)
  p = lay.default_prefix if prefix is None else prefix
  out = [p + pat for pat in lay.ignore]
  if layout == "open_clip":
    root = p[:-len("trunk.")] if p.endswith("trunk.") else p
    out.append(root + "head.*")
    if root.endswith("visual."):
      out += [root[:-len("visual.")] + pat for pat in _OPEN_CLIP_TEXT]
  return out


def detect_layout(keys: Iterable[str]) -> tuple[str, str]:
  """(layout, prefix) of the ConvNeXt trunk in a state dict."""
  keys = list(keys)
  for layout, prefix in (("rexseek", PREFIX_MLLM), ("rexseek", ""), ("open_clip", "visual.trunk."),
                         ("open_clip", "trunk."), ("timm", "")):
    lay = LAYOUTS[layout]
    if any(k.startswith(f"{prefix}{lay.stem}.0.weight") for k in keys):
      return layout, prefix
  raise ValueError("no ConvNeXt trunk found: expected keys like 'vision_stem.0.weight', "
                   "'vision_tower_aux.vision_stem.0.weight', 'stem.0.weight' or "
                   "'visual.trunk.stem.0.weight'")


def abstract_params(cfg: ConvNeXtConfig) -> dict:
  """The parameter shapes of `ConvNeXt(cfg)`: traced, no arrays made."""
  from flax.core import meta
  import jax
  import jax.numpy as jnp

  from chatrex_jax.models.convnext import ConvNeXt
  pixels = jnp.zeros((1, 32, 32, 3), jnp.float32)   # the smallest input all four stages take
  return meta.unbox(jax.eval_shape(ConvNeXt(cfg).init, jax.random.key(0), pixels)["params"])


def to_flax(state: Mapping[str, np.ndarray], cfg: ConvNeXtConfig, *, layout: str | None = None,
            prefix: str | None = None, expected: Mapping | None = None, check_shapes: bool = True,
            strict: bool = True, dtype=None, extra_ignore: Iterable[str] = ()) -> dict:
  """torch state dict -> Flax params of `ConvNeXt(cfg)` (layout/prefix auto-detected if None),
  shapes checked against `expected` (default `abstract_params(cfg)`) unless check_shapes=False."""
  if layout is None:
    layout, detected = detect_layout(state.keys())
    prefix = detected if prefix is None else prefix
  if expected is None and check_shapes:
    expected = abstract_params(cfg)
  return mapping.to_flax(state, rules(cfg, layout, prefix), what=f"ConvNeXt ({layout})",
                         expected=expected, ignore=ignore_patterns(layout, prefix) + list(extra_ignore),
                         dtype=dtype, strict=strict)


def to_torch(params: Mapping, cfg: ConvNeXtConfig, *, layout: str = "rexseek",
             prefix: str | None = None, dtype=None) -> dict[str, np.ndarray]:
  """Flax params -> torch state dict in `layout` (under `prefix`)."""
  return dict(mapping.to_torch(params, rules(cfg, layout, prefix), what=f"ConvNeXt ({layout})",
                               dtype=dtype))


def load(path, cfg: ConvNeXtConfig, **kw) -> dict:
  """A checkpoint file or folder (`torch_files.read_state`) -> Flax params (`to_flax`'s
  options; the layout is detected when not given)."""
  return torch_files.convert_file(path, lambda state: to_flax(state, cfg, **kw))


def save(params: Mapping, cfg: ConvNeXtConfig, path, **kw) -> pathlib.Path:
  """Flax params -> one safetensors file in `layout`'s torch names (`to_torch`'s options)."""
  return torch_files.write_safetensors(to_torch(params, cfg, **kw), path)
