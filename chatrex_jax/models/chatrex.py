"""The ChatRex MLLM: two vision towers, object tokens and a Qwen2/LLaMA decoder (docs/architecture.md part B).

A thin wrapper with named steps, PaliGemma-style:

  embed_image(pixel_values, pixel_values_aux)   CLIP [B,336,336,3] + ConvNeXt [B,768,768,3]
      -> image tokens [B, NI, D] (mm_projector(CLIP patches ++ last ConvNeXt map)), ConvNeXt maps
  embed_objects(maps, boxes, box_mask)           boxes [B, M, 4] xyxy in the aux frame
      -> object tokens [B, M, D] (multi-level RoI + sine box embedding -> mm_object_projector)
  embed_sequence(token_ids, source, source_index, image_tokens, object_tokens)
      -> inputs_embeds [B, T, D]: text embeddings with image/object tokens scattered in at the
         positions the data pipeline computed (`chatrex_jax.data.merge.merge_plan`)
  __call__(batch) -> {"logits", "image_tokens", "object_tokens", "inputs_embeds", ...}

Generation reuses the decoder's KV-cache loop: `embed_inputs` gives the merged embeddings,
then `chatrex_jax.inference.generate.generate(model.llm_module, params["llm"], ...)`.

Images enter NHWC, normalised with the CLIP mean/std (`chatrex_jax.inference.processor`).
Parameter tree: llm/, vision_tower/, vision_tower_aux/, mm_projector/, mm_object_projector/.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from chatrex_jax.models.clip_vit import CLIPVisionConfig, CLIPVisionTower
from chatrex_jax.models.convnext import ConvNeXt, ConvNeXtConfig
from chatrex_jax.models.llm import CausalLM, LLMConfig
from chatrex_jax.models.merge import merge_embeddings
from chatrex_jax.models.object_encoder import MultiLevelRoIEncoder
from chatrex_jax.models.projector import MLP2xGELU, fuse_image_tokens
from chatrex_jax.protocol import image as I
from chatrex_jax.protocol import tokens as C


@dataclasses.dataclass(frozen=True)
class ChatRexConfig:
  llm: LLMConfig
  clip: CLIPVisionConfig = CLIPVisionConfig()
  convnext: ConvNeXtConfig = ConvNeXtConfig()
  aux_image_size: int = I.AUX_IMAGE_SIZE  # boxes live in this frame
  roi_output_size: int = 7
  add_pos_embedding: bool = True
  # Training switches (docs/architecture.md B.11): the released ConvNeXt runs under no_grad.
  train_vision_tower: bool = True
  train_vision_tower_aux: bool = False

  @classmethod
  def from_dict(cls, sizes: Mapping, *, dtype=None, scan_layers: bool = False,
                remat_policy: str = "none", llm_hints: Mapping | None = None) -> "ChatRexConfig":
    """The one constructor from plain data (a training config's `model` sizes, a params dir's
    config.json, a golden fixture):

      {"llm": HF config.json dict, "clip": CLIPVisionConfig fields or a HF CLIP vision dict,
       "convnext": ConvNeXtConfig fields, "aux_image_size": int, any other field by name,
       "llm_family": optional, where no tensors are at hand to tell the family by}

    dtype, scan_layers, remat_policy say how to compute, not what is stored (None dtype: each
    config's default). llm_hints: more keywords for `LLMConfig.from_hf` (the family evidence
    of a checkpoint, `qkv_bias` / `tokenizer_class`, or LLMConfig fields)."""
    d = dict(sizes)
    missing = [k for k in ("llm", "clip", "convnext") if k not in d]
    if missing:
      raise ValueError(f"model sizes lack {missing}: give the LLM (HF config dict), clip and convnext")
    compute = {} if dtype is None else {"dtype": dtype}
    family = d.pop("llm_family", None)
    llm_kw = dict(scan_layers=scan_layers, remat_policy=remat_policy, **compute)
    llm_kw.update(llm_hints or {})
    llm = LLMConfig.from_hf(dict(d.pop("llm")), **({"family": family} if family else {}), **llm_kw)
    clip = CLIPVisionConfig.from_hf(d.pop("clip"), remat=remat_policy != "none", **compute)
    convnext = ConvNeXtConfig(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in dict(d.pop("convnext")).items()}, **compute)
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"unknown ChatRexConfig fields {unknown}")
    return cls(llm=llm, clip=clip, convnext=convnext, **d)

  @property
  def spatial_scale(self) -> float:
    """Level-0 ConvNeXt cells per aux-image pixel (192 / 768 = 0.25)."""
    return 1.0 / self.convnext.patch_size

  @property
  def num_image_tokens(self) -> int:
    return self.clip.grid ** 2


class ChatRex(nn.Module):
  config: ChatRexConfig

  def setup(self):
    cfg = self.config
    hidden = cfg.llm.hidden_size
    dtype, param_dtype = cfg.llm.dtype, cfg.llm.param_dtype
    self.llm = CausalLM(cfg.llm)
    self.vision_tower = CLIPVisionTower(cfg.clip)
    self.vision_tower_aux = ConvNeXt(cfg.convnext)
    self.mm_projector = MLP2xGELU(hidden, dtype, param_dtype)
    self.mm_object_projector = MLP2xGELU(hidden, dtype, param_dtype)
    self.box_encoder = MultiLevelRoIEncoder(
        output_size=cfg.roi_output_size, spatial_scale=cfg.spatial_scale,
        add_pos_embedding=cfg.add_pos_embedding)

  @property
  def llm_module(self) -> CausalLM:
    return CausalLM(self.config.llm)

  def encode_aux(self, pixel_values_aux: jax.Array) -> tuple[jax.Array, ...]:
    """ConvNeXt stage maps (NHWC); gradient-free unless `train_vision_tower_aux`."""
    maps = self.vision_tower_aux(pixel_values_aux)
    if not self.config.train_vision_tower_aux:
      maps = jax.tree.map(jax.lax.stop_gradient, maps)
    return maps

  def embed_image(self, pixel_values: jax.Array, pixel_values_aux: jax.Array):
    """[B, Hc, Wc, 3], [B, Ha, Wa, 3] -> (image tokens [B, NI, D], ConvNeXt maps, CLIP features)."""
    clip = self.vision_tower(pixel_values)
    if not self.config.train_vision_tower:
      clip = jax.lax.stop_gradient(clip)
    maps = self.encode_aux(pixel_values_aux)
    tokens = self.mm_projector(fuse_image_tokens(clip, maps[-1]))
    return tokens, maps, clip

  def embed_objects(self, maps, boxes: jax.Array, box_mask: jax.Array):
    """maps from `embed_image`, boxes [B, M, 4] xyxy (aux frame), box_mask [B, M] bool
    -> (object tokens [B, M, D] (zero on padding), raw RoI features [B, M, sum C])."""
    raw = self.box_encoder(maps, boxes, box_mask)
    tokens = self.mm_object_projector(raw)
    return jnp.where(box_mask[..., None], tokens, 0).astype(tokens.dtype), raw

  def embed_sequence(self, token_ids, source, source_index, image_tokens, object_tokens):
    """Text embeddings with image/object tokens at the planned positions -> [B, T, D]."""
    text = self.llm.embed(token_ids)
    return merge_embeddings(text, image_tokens, object_tokens, source, source_index)

  def embed_inputs(self, batch: Mapping[str, jax.Array]):
    """All embedding steps for a batch (see `__call__` for the keys) -> (embeds, intermediates)."""
    image_tokens, maps, clip = self.embed_image(batch["pixel_values"], batch["pixel_values_aux"])
    object_tokens, raw = self.embed_objects(maps, batch["boxes"], batch["box_mask"])
    embeds = self.embed_sequence(batch["token_ids"], batch["source"], batch["source_index"],
                                 image_tokens, object_tokens)
    inter = {"clip_features": clip, "aux_maps": maps, "image_tokens": image_tokens,
             "object_features_raw": raw, "object_tokens": object_tokens}
    return embeds, inter

  def __call__(self, batch: Mapping[str, jax.Array], return_intermediates: bool = False) -> dict:
    """Forward pass for training / scoring.

    batch: pixel_values [B, Hc, Wc, 3], pixel_values_aux [B, Ha, Wa, 3], boxes [B, M, 4],
      box_mask [B, M], and the merge plan: token_ids, source, source_index, attention_mask,
      position_ids [B, T] (`chatrex_jax.data.merge.merge_plan`).
    returns: {"logits": [B, T, V] fp32, "inputs_embeds": [B, T, D], + intermediates if asked}.
    """
    embeds, inter = self.embed_inputs(batch)
    out = self.llm(inputs_embeds=embeds, positions=batch["position_ids"],
                   key_valid=batch["attention_mask"].astype(bool))
    result = {"logits": out["logits"], "inputs_embeds": embeds}
    if return_intermediates:
      result.update(inter)
    return result

  def token_loss(self, batch: Mapping[str, jax.Array], max_label_tokens: int = 0):
    """The training loss's terms, the [B, T, V] logits never built (`CausalLM.token_loss`).

    batch as `__call__` plus labels [B, T]. With `max_label_tokens` = L > 0 only the first L
    labelled positions of each row are scored (hidden state t predicts label t + 1), so the
    LM head runs on answer tokens only; 0 scores every position. Returns (summed NLL [] fp32,
    hits [B, L'] bool, targets [B, L'], valid [B, L'] bool, dropped [] int: labelled tokens
    that did not fit in L; 0 when L covers every answer, which the caller reports).
    """
    embeds, _ = self.embed_inputs(batch)
    hidden = self.llm(inputs_embeds=embeds, positions=batch["position_ids"],
                      key_valid=batch["attention_mask"].astype(bool), compute_logits=False)["hidden"]
    if max_label_tokens:
      positions, targets, valid, dropped = label_positions(batch["labels"], max_label_tokens)
      hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    else:
      targets = batch["labels"][:, 1:]
      valid = targets != C.IGNORE_INDEX
      targets = jnp.where(valid, targets, 0)
      hidden, dropped = hidden[:, :-1], jnp.int32(0)
    total, hits = self.llm.token_loss(hidden, targets, valid)
    return total, hits, targets, valid, dropped


def label_positions(labels: jax.Array, max_label_tokens: int):
  """labels [B, T] -> (positions [B, L], targets [B, L], valid [B, L], dropped []).

  positions[b, l] is the hidden-state index t whose next-token target labels[b, t + 1] is the
  l-th labelled token of row b; rows with fewer labels are padded with valid = False.
  """
  shift = labels[:, 1:]
  is_label = shift != C.IGNORE_INDEX
  length = shift.shape[1]
  take = min(max_label_tokens, length)
  # A stable sort on "not a label" puts the labelled positions first, in order.
  positions = jnp.argsort(~is_label, axis=1, stable=True)[:, :take].astype(jnp.int32)
  valid = jnp.take_along_axis(is_label, positions, axis=1)
  targets = jnp.where(valid, jnp.take_along_axis(shift, positions, axis=1), 0)
  dropped = jnp.sum(is_label) - jnp.sum(valid)
  return positions, targets, valid, dropped


def lm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy over labels != IGNORE_INDEX (HF `ForCausalLMLoss`).

  logits [B, T, V], labels [B, T] -> (mean loss, number of labelled tokens).
  """
  shift_logits = logits[:, :-1].astype(jnp.float32)
  shift_labels = labels[:, 1:]
  valid = shift_labels != C.IGNORE_INDEX
  logp = jax.nn.log_softmax(shift_logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, shift_labels, 0)[..., None], axis=-1)[..., 0]
  count = valid.sum()
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1), count


def match_projectors_to_embeddings(config: ChatRexConfig, params, pixel_values, pixel_values_aux,
                                   boxes, box_mask, target_rms: float | None = None):
  """Data-dependent init of the two projectors' last layers (`fc2`): on a sample batch, their
  outputs are centred (per feature) and scaled to `target_rms` (default: the rms of the LLM's
  input embedding table), so image and object tokens enter the LLM at the scale of its own
  token embeddings. Random projectors over random towers otherwise emit tokens dominated by one
  shared vector at tens of times that scale (measured in the demo: rms 4.3 vs 0.14, the
  per-region part 17% of it), which a pre-norm LLM's attention can barely add to.

  pixel_values [B, Hc, Wc, 3], pixel_values_aux [B, Ha, Wa, 3], boxes [B, M, 4] (aux frame),
  box_mask [B, M]. Returns new params (the rest unchanged)."""
  model = ChatRex(config)
  if target_rms is None:
    target_rms = float(jnp.sqrt(jnp.mean(jnp.square(params["llm"]["embed_tokens"]["embedding"]))))

  def outputs(mdl):
    image_tokens, maps, _ = mdl.embed_image(pixel_values, pixel_values_aux)
    object_tokens, _ = mdl.embed_objects(maps, boxes, box_mask)
    return image_tokens.reshape(-1, image_tokens.shape[-1]), object_tokens[box_mask]

  image_out, object_out = nn.apply(outputs, model)({"params": params})
  params = dict(params)
  for name, y in (("mm_projector", image_out), ("mm_object_projector", object_out)):
    mean = jnp.mean(y, axis=0)
    scale = target_rms / jnp.sqrt(jnp.mean(jnp.square(y - mean)))
    fc2 = params[name]["fc2"]
    params[name] = dict(params[name], fc2=dict(fc2, kernel=fc2["kernel"] * scale,
                                                bias=(fc2["bias"] - mean) * scale))
  return params


def init_params(config: ChatRexConfig, rng: jax.Array, batch_size: int = 1, num_tokens: int = 8,
                max_objects: int = 4):
  """Random (boxed, logically partitioned) parameters for `ChatRex(config)`."""
  model = ChatRex(config)
  # Compiled: run op by op, init's forward pass of the towers takes twice as long.
  return jax.jit(model.init)(rng, example_batch(config, batch_size, num_tokens, max_objects))


def example_batch(config: ChatRexConfig, batch_size: int = 1, num_tokens: int = 8,
                  max_objects: int = 4) -> dict:
  """A zero batch with the right shapes (for init / eval_shape / AOT compilation)."""
  clip_px = config.clip.image_size
  aux_px = config.aux_image_size
  b, t, m = batch_size, num_tokens, max_objects
  return {
      "pixel_values": jnp.zeros((b, clip_px, clip_px, 3), jnp.float32),
      "pixel_values_aux": jnp.zeros((b, aux_px, aux_px, 3), jnp.float32),
      "boxes": jnp.zeros((b, m, 4), jnp.float32), "box_mask": jnp.zeros((b, m), bool),
      "token_ids": jnp.zeros((b, t), jnp.int32), "source": jnp.zeros((b, t), jnp.int32),
      "source_index": jnp.zeros((b, t), jnp.int32), "attention_mask": jnp.ones((b, t), jnp.int32),
      "position_ids": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
  }
