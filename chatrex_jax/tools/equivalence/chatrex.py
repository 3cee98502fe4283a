"""Runner for the `chatrex_forward` fixture: the whole MLLM forward, loss and greedy generation."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from chatrex_jax.convert import chatrex as chatrex_convert
from chatrex_jax.data.merge import merge_plan
from chatrex_jax.inference.generate import SamplingConfig, generate
from chatrex_jax.models.chatrex import ChatRex, ChatRexConfig, lm_loss
from chatrex_jax.tools.equivalence.registry import Fixture, RunResult, register


def fixture_config(cfg: dict, **compute) -> ChatRexConfig:
  """The fixture's model sizes; `compute` as `ChatRexConfig.from_dict` (dtype=, ...)."""
  return ChatRexConfig.from_dict(dict(
      llm=dict(cfg["qwen2_config"], model_type="qwen2"),
      clip=dict(cfg["clip_vision_config"], mm_vision_select_layer=cfg["mm_vision_select_layer"],
                mm_vision_select_feature=cfg["mm_vision_select_feature"]),
      convnext=dict(depths=cfg["convnext"]["depths"], dims=cfg["convnext"]["dims"]),
      aux_image_size=cfg["aux_image_size"], roi_output_size=cfg["box_encoder"]["output_size"],
      add_pos_embedding=cfg["box_encoder"]["add_pos_embedding"]), **compute)


def _batch(config, ids, mask, labels, pixels, pixels_aux, boxes, counts):
  max_objects = boxes.shape[1]
  plan = merge_plan(ids, labels=labels, attention_mask=mask, num_objects=counts,
                    max_objects=max_objects, num_image_tokens=config.num_image_tokens)
  batch = {k: jnp.asarray(plan[k]) for k in ("token_ids", "source", "source_index", "attention_mask")}
  t = plan["token_ids"].shape[1]
  # The official forward passes position_ids=None: arange(T) on every position, padding included.
  batch["position_ids"] = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), plan["token_ids"].shape)
  batch["pixel_values"] = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  batch["pixel_values_aux"] = jnp.asarray(pixels_aux.transpose(0, 2, 3, 1))
  batch["boxes"] = jnp.asarray(boxes)
  batch["box_mask"] = jnp.arange(max_objects)[None, :] < jnp.asarray(counts)[:, None]
  return batch, plan


@register("chatrex_forward")
def run_chatrex_forward(fx: Fixture) -> RunResult:
  config = fixture_config(fx.config)
  model = ChatRex(config)
  params = chatrex_convert.to_flax(fx.weights(), config, layout="rexseek")
  x = fx.inputs
  batch, plan = _batch(config, x["input_ids"], x["attention_mask"], x["labels"], x["pixel_values"],
                       x["pixel_values_aux"], x["gt_boxes"], x["num_gt_boxes_per_image"])
  out = model.apply({"params": params}, batch, return_intermediates=True)
  loss, _ = lm_loss(out["logits"], jnp.asarray(plan["labels"]))
  valid = np.asarray(batch["box_mask"])
  outputs = {
      "logits": np.asarray(out["logits"]), "loss": np.asarray(loss),
      "merged_labels": plan["labels"].astype(np.int64),
      "merged_attention_mask": plan["attention_mask"].astype(np.int64),
      "merged_inputs_embeds": np.asarray(out["inputs_embeds"]),
      "merged_token_types": plan["source"].astype(np.int64),
      "clip_features": np.asarray(out["clip_features"]),
      "image_features": np.asarray(out["image_tokens"]),
      "object_features_raw": np.asarray(out["object_features_raw"])[valid],
      "object_features": np.asarray(out["object_tokens"])[valid],
  }
  for s, m in enumerate(out["aux_maps"]):
    outputs[f"aux_stage_{s}"] = np.asarray(m).transpose(0, 3, 1, 2)
  # Greedy generation from the merged embeddings (no EOS stop, as the fixture).
  gbatch, gplan = _batch(config, x["gen_input_ids"], np.ones_like(x["gen_input_ids"]), None,
                         x["gen_pixel_values"], x["gen_pixel_values_aux"], x["gen_gt_boxes"],
                         x["gen_num_gt_boxes_per_image"])
  embeds, _ = model.apply({"params": params}, gbatch, method=ChatRex.embed_inputs)
  gen = generate(model.llm_module, params["llm"], inputs_embeds=embeds,
                 attention_mask=gplan["attention_mask"],
                 sampling=SamplingConfig(max_new_tokens=int(fx.config["gen_max_new_tokens"]),
                                         return_logits=True))
  outputs["gen_tokens"] = gen.tokens.astype(np.int64)
  outputs["gen_step_logits"] = gen.step_logits
  return RunResult(outputs=outputs)
