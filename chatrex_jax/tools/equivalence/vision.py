"""Golden-fixture runners for the vision towers: `clip_vision` and `convnext_aux`.

Both load `weights.safetensors` through the project's converters (the code users run on real
checkpoints), with the parameter shapes checked against `jax.eval_shape` of the model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from chatrex_jax.convert import clip as clip_convert
from chatrex_jax.convert import convnext as convnext_convert
from chatrex_jax.models import clip_vit, convnext
from chatrex_jax.tools.equivalence.registry import Fixture, RunResult, register


def _nchw_to_nhwc(x: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1))))


@register("clip_vision")
def run_clip_vision(fx: Fixture) -> RunResult:
  c = fx.config
  cfg = clip_vit.CLIPVisionConfig.from_hf(
      c["clip_vision_config"], select_layer=int(c["mm_vision_select_layer"]),
      select_feature=c.get("mm_vision_select_feature", "patch"))
  model = clip_vit.CLIPVisionTower(cfg)
  pixels = _nchw_to_nhwc(fx.inputs["pixel_values"])
  abstract = jax.eval_shape(model.init, jax.random.key(0), pixels)["params"]
  params = clip_convert.to_flax(fx.weights(), cfg, expected=abstract)
  out = jax.jit(lambda p, x: model.apply({"params": p}, x, output="all"))(params, pixels)
  # image_features from the default path (runs only the layers up to the selected one), as the
  # MLLM uses it; the full forward provides the other outputs.
  features_only = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, pixels)
  return RunResult(outputs={
      "image_features": np.asarray(features_only),
      "hidden_states": np.asarray(out["hidden_states"]),
      "last_hidden_state": np.asarray(out["last_hidden_state"]),
      "pooler_output": np.asarray(out["pooler_output"]),
  })


@register("convnext_aux")
def run_convnext_aux(fx: Fixture) -> RunResult:
  cfg = convnext.ConvNeXtConfig.from_dict(fx.config)
  model = convnext.ConvNeXt(cfg)
  images = _nchw_to_nhwc(fx.inputs["images"])
  abstract = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  params = convnext_convert.to_flax(fx.weights(), cfg, layout="rexseek", prefix="",
                                    expected=abstract)
  maps, inter = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))(
      params, images)
  outputs = {f"stage_{s}": np.asarray(m) for s, m in enumerate(convnext.to_nchw(maps))}
  outputs["stem"] = np.asarray(jnp.transpose(inter["intermediates"]["stem"][0], (0, 3, 1, 2)))
  return RunResult(outputs=outputs)
