"""UPN as a `TrainTask` of the shared trainer (issue 9): dual-granularity prompt tuning.

Every example carries a prompt id (`upn_data.PROMPT_IDS`: 0 fine, 1 coarse). One encoder pass
serves both prompts; the decoder runs once per prompt (the model's `decode` takes a static
prompt name) and each example keeps the outputs of its own prompt (`jnp.where`, so the other
prompt's branch gets zero gradient from it). The loss is `upn_criterion` (final layer,
auxiliary decoder layers, encoder two-stage proposals) on those outputs.

Normalisation: the criterion divides by the number of target boxes of the batch it sees; the
task returns loss_sum = criterion * num_boxes(clamped >= 1) and denominator = num_boxes, so the
trainer's sum(loss_sum) / sum(denominator) over micro-batches and devices is DINO's global
normalisation by the number of boxes in the whole global batch.

Encoder proposals: the model returns the selected encoder boxes only after stop_gradient
(`enc_topk_boxes_unsigmoid`, they are the decoder's reference points). DINO's interm loss uses
the undetached boxes so the encoder box head `enc_out_bbox_embed` learns; `interm_outputs`
recomputes them here from the model's own submodules (same arithmetic as `UPN.decode`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from chatrex_jax.data.upn_data import PROMPT_IDS
from chatrex_jax.models.upn.transformer import encoder_output_proposals
from chatrex_jax.models.upn.upn import UPN, UPNConfig
from chatrex_jax.train.task import TrainTask
from chatrex_jax.train.trainer import SelectKeys
from chatrex_jax.train.upn_losses import UPNLossConfig, count_boxes, upn_criterion

PROMPTS = ("fine", "coarse")   # index = prompt id

TASK_MODEL_KEYS = ("init_from", "freeze")   # model-section keys that are not UPNConfig fields
# What the train step reads (`loss`) and `batch_signature` needs, of an `upn_data` batch.
BATCH_KEYS = ("images", "mask", "boxes", "box_mask", "prompt_id", "num_boxes")


def model_config(model_section) -> UPNConfig:
  """UPNConfig from a UPN training config's `model` section (the training keys left out)."""
  return UPNConfig.from_config_dict(
      {k: v for k, v in dict(model_section).items() if k not in TASK_MODEL_KEYS})


def _tokens(side: int, num_levels: int) -> int:
  """Encoder tokens of a square side x side image (levels at strides 4, 8, ...)."""
  n, s = 0, side
  s = -(-s // 4)
  for _ in range(num_levels):
    n += s * s
    s = -(-s // 2)
  return n


def init_side(config: UPNConfig) -> int:
  """Smallest power-of-two image side whose encoder has >= num_queries tokens (for init)."""
  side = 64
  while _tokens(side, config.num_feature_levels) < config.num_queries:
    side *= 2
  return side


def forward_both(module: UPN, images, mask) -> dict:
  """`UPN.apply(..., method=forward_both)`: encoder once, decoder per prompt.

  returns {"fine": out, "coarse": out}, each with pred_logits [B, Q, 1], pred_boxes [B, Q, 4],
  all_logits [L, B, Q, 1], all_boxes [L, B, Q, 4], interm_logits [B, Q, 1] and
  interm_boxes [B, Q, 4] (sigmoid, undetached encoder proposals of that prompt's top-Q).
  """
  enc = module.encode(images, mask)
  out_mem, props = encoder_output_proposals(enc["memory"], enc["mask_flatten"], enc["spatial_shapes"])
  out_mem = module.enc_output_norm(module.enc_output(out_mem))
  coords = module.enc_out_bbox_embed(out_mem) + props          # [B, S, 4], +inf where invalid
  res = {}
  for name in PROMPTS:
    d = module.decode(enc, name)
    idx = d["enc_topk_indices"][..., None]
    res[name] = dict(pred_logits=d["pred_logits"], pred_boxes=d["pred_boxes"],
                     all_logits=d["all_logits"], all_boxes=d["all_boxes"],
                     interm_logits=jnp.take_along_axis(d["enc_class_logits"], idx, axis=1),
                     interm_boxes=jax.nn.sigmoid(jnp.take_along_axis(coords, idx, axis=1)))
  return res


def select_prompt(outs: dict, prompt_id) -> dict:
  """Per-example choice between the fine (id 0) and coarse (id 1) outputs -> criterion input."""
  fine = jnp.asarray(prompt_id) == PROMPT_IDS["fine"]

  def pick(key, batch_axis):
    a, b = outs["fine"][key], outs["coarse"][key]
    shape = [1] * a.ndim
    shape[batch_axis] = a.shape[batch_axis]
    return jnp.where(fine.reshape(shape), a, b)
  all_logits, all_boxes = pick("all_logits", 1), pick("all_boxes", 1)
  return {"pred_logits": all_logits[-1], "pred_boxes": all_boxes[-1],
          "aux_outputs": {"pred_logits": all_logits[:-1], "pred_boxes": all_boxes[:-1]},
          "interm_outputs": {"pred_logits": pick("interm_logits", 0),
                             "pred_boxes": pick("interm_boxes", 0)}}


class UPNTask(TrainTask):
  """Binds UPN, its criterion and the UPN data pipeline for `train.trainer.Trainer`.

  config sections: model (chatrex_jax/configs/upn_*.py), loss (UPNLossConfig fields, optional),
  optim (incl. lr_backbone), data (`upn_data.default_upn_data_config`).
  """

  def __init__(self, config):
    self.config = config
    self.model_config = model_config(config.model)
    self.model = UPN(self.model_config)
    self.loss_config = UPNLossConfig.from_dict(dict(config.get("loss", {}) or {}))
    self._side = init_side(self.model_config)

  # -- parameters ------------------------------------------------------------------------------

  def _example(self):
    return (jnp.zeros((1, self._side, self._side, 3), jnp.float32),
            jnp.zeros((1, self._side, self._side), bool))

  def abstract_params(self):
    return jax.eval_shape(self.model.init, jax.random.key(0), *self._example())["params"]

  def init_params(self, rng):
    return self.model.init(rng, *self._example())["params"]

  def pretrained_params(self):
    """Parameters from `model.init_from` (an official UPN .pth / safetensors), or None."""
    path = self.config.model.get("init_from", "")
    if not path:
      return None
    from chatrex_jax.convert import upn as convert_upn
    params, report = convert_upn.load(path, self.model_config)
    if report.unexpected:
      print(f"UPN init_from {path}: {report}", flush=True)
    return params

  def trainable_patterns(self):
    return ("*",)

  def frozen_patterns(self):
    return tuple(self.config.model.get("freeze", ()) or ())

  def group_lrs(self):
    lr_bb = self.config.optim.get("lr_backbone", None)
    return {"backbone/*": float(lr_bb)} if lr_bb is not None else None

  # -- loss ------------------------------------------------------------------------------------

  def outputs(self, params, batch) -> dict:
    """Criterion inputs for the batch (each example with its own prompt)."""
    outs = self.model.apply({"params": params}, batch["images"], batch["mask"],
                            method=forward_both)
    return select_prompt(outs, batch["prompt_id"])

  def loss(self, params, batch, rng):
    del rng  # UPN has no dropout
    outputs = self.outputs(params, batch)
    targets = {"boxes": batch["boxes"], "mask": batch["box_mask"]}
    num = count_boxes(targets["mask"])                  # clamped >= 1 (the criterion's normaliser)
    total, losses = upn_criterion(outputs, targets, num, self.loss_config)
    raw = jnp.sum(jnp.asarray(batch["box_mask"]).astype(jnp.float32))
    metrics = {k: losses[k] for k in ("loss_ce", "loss_bbox", "loss_giou") if k in losses}
    metrics["num_boxes"] = raw
    return total * num, raw, metrics

  def abstract_batch(self):
    """BATCH_KEYS of a global batch: data.batch_size images on the data.max_size canvas,
    data.max_targets boxes (the layout of `upn_data`)."""
    d = self.config.data
    b, side, targets = int(d.batch_size), int(d.max_size), int(d.max_targets)
    shapes = {"images": ((b, side, side, 3), jnp.float32), "mask": ((b, side, side), jnp.bool_),
              "boxes": ((b, targets, 4), jnp.float32), "box_mask": ((b, targets), jnp.bool_),
              "prompt_id": ((b,), jnp.int32), "num_boxes": ((b,), jnp.int32)}
    return {k: jax.ShapeDtypeStruct(*shapes[k]) for k in BATCH_KEYS}

  # -- data ------------------------------------------------------------------------------------

  def make_data(self, process_index: int, process_count: int):
    from chatrex_jax.data import upn_data
    it = upn_data.make_upn_iterator(self.config.data, process_index=process_index,
                                    process_count=process_count)
    return SelectKeys(it, BATCH_KEYS)

  def batch_signature(self, local_batch) -> float:
    idx = np.asarray(local_batch["prompt_id"], np.int64) * 7 + np.asarray(local_batch["num_boxes"], np.int64)
    return float(np.sum(idx * np.arange(1, idx.size + 1)) % 1_000_003)

  def tokens_in(self, local_batch) -> float:
    """Images in the batch (the trainer's tokens_per_s is images per second for UPN)."""
    return float(np.asarray(local_batch["prompt_id"]).shape[0])
