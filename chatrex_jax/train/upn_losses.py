"""UPN training losses: DINO's SetCriterion (focal / L1 / GIoU) for binary prompts.

UPN turns detection into one binary problem per prompt (fine- or coarse-grained), so the
class dimension is C = 1 (the code accepts any C with integer target labels). The official
UPN training code is not released; the definitions follow DINO (IDEA-Research/DINO,
`models/dino/dino.py` SetCriterion and `models/dino/utils.py` sigmoid_focal_loss):

* `loss_ce`   = sigmoid_focal_loss(logits, onehot, num_boxes) * Q, where DINO's
  sigmoid_focal_loss is `loss.mean(1).sum() / num_boxes` (alpha 0.25, gamma 2) -- i.e. the
  focal loss summed over every query and class, divided by num_boxes. Unmatched queries have
  an all-zero target.
* `loss_bbox` = sum |pred - tgt| over matched pairs and the 4 cxcywh coords / num_boxes.
* `loss_giou` = sum (1 - GIoU(xyxy)) over matched pairs / num_boxes.
* Each decoder layer (final + auxiliary) and the encoder's two-stage proposals are matched
  separately with the Hungarian matcher and get the same three losses, named `loss_ce`,
  `loss_ce_0` ... `loss_ce_{L-2}` (aux layers, DINO naming) and `loss_ce_interm`.
* Weighted total = sum over names of weight[name] * loss[name]; DINO's defaults
  (`cls_loss_coef` 1.0, `bbox_loss_coef` 5.0, `giou_loss_coef` 2.0) for every layer, and
  the interm losses additionally times `interm_loss_weight` (DINO `interm_loss_coef` 1.0).
  Denoising (DN) queries are not part of UPN's described recipe and are not implemented.

`num_boxes` is the number of real target boxes in the global batch, clamped to >= 1
(`count_boxes`). With `jit` over globally sharded arrays the loss is a global sum, so pass
the global count (the default of `count_boxes`). Inside `shard_map`/`pmap`, where each device
computes a local loss over its shard and gradients are then averaged with pmean, DINO's
normalisation is `psum(count) / n_devices` (`count_boxes(mask, axis_name, per_device=True)`);
both give the same gradient.

Everything is computed in float32 and is jit-able for static shapes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
from jax import lax
import jax.numpy as jnp

from chatrex_jax.ops import boxes as box_ops
from chatrex_jax.train import matching

Array = jax.Array
LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou")


@dataclasses.dataclass(frozen=True)
class UPNLossConfig:
  """Loss weights (DINO defaults) and the matcher used by every layer.

  cls_weight / bbox_weight / giou_weight: DINO cls_loss_coef / bbox_loss_coef /
  giou_loss_coef. focal_alpha / focal_gamma: focal loss parameters. aux_loss: include the
  auxiliary decoder layers when given. interm_loss_weight: extra factor on the encoder
  (two-stage proposal) losses (DINO interm_loss_coef); interm_box_loss False drops its L1 and
  GIoU terms (DINO no_interm_box_loss). matcher: matching.MatcherConfig.
  """
  cls_weight: float = 1.0
  bbox_weight: float = 5.0
  giou_weight: float = 2.0
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  aux_loss: bool = True
  interm_loss_weight: float = 1.0
  interm_box_loss: bool = True
  matcher: matching.MatcherConfig = matching.MatcherConfig()

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None) -> "UPNLossConfig":
    """From a (possibly nested) mapping, e.g. an ml_collections ConfigDict.

    The optional 'matcher' entry is a mapping for MatcherConfig. Unknown keys raise.
    """
    d = dict(d or {})
    matcher = d.pop("matcher", None)
    names = {f.name for f in dataclasses.fields(cls)} - {"matcher"}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown UPN loss config keys {unknown}; known: {sorted(names | {'matcher'})}")
    if matcher is not None and not isinstance(matcher, matching.MatcherConfig):
      matcher = matching.MatcherConfig.from_dict(dict(matcher))
    return cls(**d, **({"matcher": matcher} if matcher is not None else {}))

  def weights(self) -> dict[str, float]:
    return {"loss_ce": self.cls_weight, "loss_bbox": self.bbox_weight,
            "loss_giou": self.giou_weight}


def count_boxes(tgt_mask: Array, axis_name: str | Sequence[str] | None = None,
                per_device: bool = False) -> Array:
  """num_boxes for the loss normalisation: real targets in the global batch, >= 1.

  Args:
    tgt_mask: [B, T] bool (the local shard inside shard_map/pmap, else the global batch).
    axis_name: mapped axis name(s) to psum over (inside shard_map/pmap), or None.
    per_device: divide the psum by the axis size (DINO's DDP form, for pmean'd gradients).
  Returns:
    float32 scalar.
  """
  n = jnp.sum(tgt_mask.astype(jnp.float32))
  if axis_name is not None:
    n = lax.psum(n, axis_name)
    if per_device:
      n = n / lax.psum(1.0, axis_name)
  return jnp.maximum(n, 1.0)


def sigmoid_focal_loss(logits: Array, targets: Array, num_boxes: Array | float,
                       alpha: float = 0.25, gamma: float = 2.0) -> Array:
  """DINO's sigmoid_focal_loss: `loss.mean(1).sum() / num_boxes`.

  Args:
    logits: [B, Q, C] pre-sigmoid. targets: [B, Q, C] in {0, 1} (float).
    num_boxes: scalar normaliser. alpha < 0 disables the alpha weighting.
  Returns:
    float32 scalar.
  """
  x = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  prob = jax.nn.sigmoid(x)
  # binary_cross_entropy_with_logits, the numerically stable form.
  ce = jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
  p_t = prob * t + (1 - prob) * (1 - t)
  loss = ce * (1 - p_t)**gamma
  if alpha >= 0:
    loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
  return loss.mean(1).sum() / num_boxes


def set_losses(pred_logits: Array, pred_boxes: Array, tgt_boxes: Array, tgt_mask: Array,
               match: matching.Match, num_boxes: Array | float,
               tgt_labels: Array | None = None,
               config: UPNLossConfig = UPNLossConfig()) -> dict[str, Array]:
  """Unweighted DINO losses of one decoder layer for a given matching.

  Args:
    pred_logits: [B, Q, C]; pred_boxes: [B, Q, 4] normalised cxcywh.
    tgt_boxes: [B, T, 4] normalised cxcywh; tgt_mask: [B, T] bool; tgt_labels: [B, T] or None.
    match: matching.Match ([B, T] fields). num_boxes: scalar (see count_boxes).
  Returns:
    {"loss_ce", "loss_bbox", "loss_giou"}: float32 scalars.
  """
  b, q, c = pred_logits.shape
  valid = match.valid & tgt_mask.astype(bool)
  matched, tgt_of_query = matching.query_targets(match._replace(valid=valid), q)
  if tgt_labels is None:
    onehot = jnp.zeros((b, q, c), jnp.float32).at[..., 0].set(matched.astype(jnp.float32))
  else:
    labels = jnp.take_along_axis(jnp.asarray(tgt_labels, jnp.int32), tgt_of_query, axis=1)
    onehot = jax.nn.one_hot(labels, c, dtype=jnp.float32) * matched[..., None]
  loss_ce = sigmoid_focal_loss(pred_logits, onehot, num_boxes, config.focal_alpha,
                               config.focal_gamma) * q

  src = jnp.take_along_axis(pred_boxes.astype(jnp.float32), match.pred_idx[..., None], axis=1)
  # Padded / unmatched slots: a harmless box on both sides, so no NaN reaches the gradient.
  src = matching.safe_boxes(src, valid)
  tgt = matching.safe_boxes(tgt_boxes.astype(jnp.float32), valid)
  w = valid.astype(jnp.float32)
  l1 = jnp.abs(src - tgt).sum(-1)
  giou = box_ops.pairwise_giou(box_ops.cxcywh_to_xyxy(src)[..., None, :],
                               box_ops.cxcywh_to_xyxy(tgt)[..., None, :])[..., 0, 0]
  return {
      "loss_ce": loss_ce,
      "loss_bbox": jnp.sum(l1 * w) / num_boxes,
      "loss_giou": jnp.sum((1 - giou) * w) / num_boxes,
  }


@functools.partial(jax.jit, static_argnames=("config",))
def layer_losses(pred_logits: Array, pred_boxes: Array, tgt_boxes: Array, tgt_mask: Array,
                 num_boxes: Array | float, tgt_labels: Array | None = None,
                 config: UPNLossConfig = UPNLossConfig()) -> dict[str, Array]:
  """Hungarian-matches one layer's predictions to the targets, then `set_losses`."""
  match = matching.hungarian_match(pred_logits, pred_boxes, tgt_boxes, tgt_mask, tgt_labels,
                                   config.matcher)
  return set_losses(pred_logits, pred_boxes, tgt_boxes, tgt_mask, match, num_boxes,
                    tgt_labels, config)


def _stack_layers(outputs: Mapping[str, Any], use_aux: bool) -> tuple[Array, Array]:
  """[L, B, Q, C] logits and [L, B, Q, 4] boxes: aux layers first, the final layer last."""
  logits = [jnp.asarray(outputs["pred_logits"])[None]]
  boxes = [jnp.asarray(outputs["pred_boxes"])[None]]
  aux = outputs.get("aux_outputs") if use_aux else None
  if aux is not None:
    if isinstance(aux, Mapping):  # stacked arrays [L-1, B, Q, ...]
      logits.insert(0, jnp.asarray(aux["pred_logits"]))
      boxes.insert(0, jnp.asarray(aux["pred_boxes"]))
    else:  # DINO's list of per-layer dicts
      if len(aux):
        logits.insert(0, jnp.stack([jnp.asarray(a["pred_logits"]) for a in aux]))
        boxes.insert(0, jnp.stack([jnp.asarray(a["pred_boxes"]) for a in aux]))
  return jnp.concatenate(logits).astype(jnp.float32), jnp.concatenate(boxes).astype(jnp.float32)


def upn_criterion(outputs: Mapping[str, Any], targets: Mapping[str, Any],
                  num_boxes: Array | float | None = None,
                  config: UPNLossConfig | Mapping[str, Any] = UPNLossConfig()
                  ) -> tuple[Array, dict[str, Array]]:
  """All UPN losses (final layer, auxiliary layers, encoder proposals) and their weighted sum.

  Args:
    outputs: mapping with
      "pred_logits" [B, Q, C] (C = 1 for UPN), "pred_boxes" [B, Q, 4] normalised cxcywh
        (the last decoder layer);
      optional "aux_outputs": either DINO's list of {"pred_logits", "pred_boxes"} for the
        earlier decoder layers, or one mapping of stacked arrays [L-1, B, Q, C] / [L-1, B, Q, 4];
      optional "interm_outputs": {"pred_logits" [B, Q', C], "pred_boxes" [B, Q', 4]}, the
        encoder's two-stage proposals.
    targets: mapping with "boxes" [B, T, 4] normalised cxcywh, "mask" [B, T] bool and
      optionally "labels" [B, T] int (absent = 0, the binary UPN case).
    num_boxes: scalar normaliser (count_boxes on the global batch); None = count_boxes(mask).
    config: UPNLossConfig or a mapping for UPNLossConfig.from_dict.
  Returns:
    (total float32 scalar, dict of unweighted float32 scalar losses with DINO names:
     loss_ce / loss_bbox / loss_giou (final layer), *_0 ... *_{L-2} (aux layers),
     *_interm (encoder)).
  """
  if not isinstance(config, UPNLossConfig):
    config = UPNLossConfig.from_dict(config)
  for key in ("pred_logits", "pred_boxes"):
    if key not in outputs:
      raise KeyError(f"outputs lacks {key!r}; got keys {sorted(outputs)}")
  for key in ("boxes", "mask"):
    if key not in targets:
      raise KeyError(f"targets lacks {key!r}; got keys {sorted(targets)}")
  tgt_boxes = jnp.asarray(targets["boxes"], jnp.float32)
  tgt_mask = jnp.asarray(targets["mask"]).astype(bool)
  tgt_labels = targets.get("labels")
  if num_boxes is None:
    num_boxes = count_boxes(tgt_mask)
  num_boxes = jnp.asarray(num_boxes, jnp.float32)

  def one_layer(lg, bx):
    return layer_losses(lg, bx, tgt_boxes, tgt_mask, num_boxes, tgt_labels, config)

  logits, boxes = _stack_layers(outputs, config.aux_loss)
  per_layer = jax.vmap(one_layer)(logits, boxes)  # each [L]
  n_layers = logits.shape[0]
  weights = config.weights()
  losses: dict[str, Array] = {}
  total = jnp.zeros((), jnp.float32)
  for name in LOSS_NAMES:
    for i in range(n_layers):
      key = name if i == n_layers - 1 else f"{name}_{i}"
      losses[key] = per_layer[name][i]
      total = total + weights[name] * losses[key]

  interm = outputs.get("interm_outputs")
  if interm is not None:
    li = layer_losses(jnp.asarray(interm["pred_logits"], jnp.float32),
                      jnp.asarray(interm["pred_boxes"], jnp.float32), tgt_boxes, tgt_mask,
                      num_boxes, tgt_labels, config)
    for name in LOSS_NAMES:
      w = weights[name] * config.interm_loss_weight
      if name != "loss_ce" and not config.interm_box_loss:
        w = 0.0
      losses[f"{name}_interm"] = li[name]
      total = total + w * li[name]
  return total, losses
