"""The paper's recall at IoU 0.5 (ChatRex Table: UPN proposal recall; detection recall).

* Proposal recall: a GT box is recalled when **any** proposal has IoU >= thr with it (proposals
  are class-agnostic and may cover several GT boxes). recall = recalled GT / all GT, pooled
  over the dataset (`pooled`), also reported as the mean of per-image recalls (`per_image_mean`,
  images without GT skipped).
* Detection recall: one-to-one, per category. Predictions (optionally sorted by score,
  descending) are matched greedily to the unmatched GT box of the same category with the
  highest IoU >= thr; recall = matched GT / all GT. With `one_to_one=False` it is the
  proposal rule restricted to same-category predictions.

IoU: `chatrex_jax.ops.boxes.pairwise_iou` in float64 (xyxy, intersection / union, 0 without
overlap, no +1, as RexSeek / pycocotools continuous boxes). All host-side NumPy.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from chatrex_jax.ops import boxes as box_ops


def _boxes(b, what: str) -> np.ndarray:
  a = np.asarray(b, np.float64)
  if a.size == 0:
    return np.zeros((0, 4))
  if a.ndim != 2 or a.shape[1] != 4:
    raise ValueError(f"{what} must be [N, 4] xyxy, got shape {a.shape}")
  return a


def iou_matrix(a, b) -> np.ndarray:
  """[N, M] IoU of xyxy boxes a [N, 4] and b [M, 4] (float64; shapes checked)."""
  return box_ops.pairwise_iou(_boxes(a, "boxes a"), _boxes(b, "boxes b"), dtype=np.float64)


@dataclasses.dataclass
class RecallResult:
  """pooled: recalled / total GT; per_image_mean: mean per-image recall (images with GT);
  recalled / total: counts; per_image: list of (recalled, total) per image."""
  pooled: float
  per_image_mean: float
  recalled: int
  total: int
  per_image: list

  def to_dict(self) -> dict:
    return {"recall": self.pooled, "per_image_mean": self.per_image_mean,
            "recalled": self.recalled, "total": self.total}


def _summarise(per_image: list) -> RecallResult:
  rec = sum(r for r, _ in per_image)
  tot = sum(t for _, t in per_image)
  means = [r / t for r, t in per_image if t > 0]
  return RecallResult(rec / tot if tot else 0.0, float(np.mean(means)) if means else 0.0,
                      rec, tot, per_image)


def covered(gt_boxes, proposals, iou_threshold: float = 0.5) -> np.ndarray:
  """[G] bool: whether each GT box has a proposal with IoU >= threshold."""
  gt = _boxes(gt_boxes, "gt_boxes")
  if gt.shape[0] == 0:
    return np.zeros((0,), bool)
  p = _boxes(proposals, "proposals")
  if p.shape[0] == 0:
    return np.zeros((gt.shape[0],), bool)
  return (iou_matrix(gt, p) >= iou_threshold).any(axis=1)


def proposal_recall(gt_boxes: Sequence, proposals: Sequence, iou_threshold: float = 0.5,
                    max_proposals: int | None = None) -> RecallResult:
  """Dataset proposal recall. gt_boxes / proposals: per-image lists of [N, 4] xyxy;
  max_proposals keeps only the first (highest-ranked) proposals of each image."""
  if len(gt_boxes) != len(proposals):
    raise ValueError(f"{len(gt_boxes)} GT images but {len(proposals)} proposal lists")
  per = []
  for g, p in zip(gt_boxes, proposals):
    p = _boxes(p, "proposals")
    if max_proposals is not None:
      p = p[:max_proposals]
    c = covered(g, p, iou_threshold)
    per.append((int(c.sum()), int(c.shape[0])))
  return _summarise(per)


def match_detections(gt_boxes, gt_labels, pred_boxes, pred_labels, pred_scores=None,
                     iou_threshold: float = 0.5) -> np.ndarray:
  """[G] bool: GT boxes matched one-to-one by same-label predictions (greedy, predictions in
  descending score order - stable, so ties keep input order - each taking its best unmatched GT)."""
  gt = _boxes(gt_boxes, "gt_boxes")
  pb = _boxes(pred_boxes, "pred_boxes")
  gl, pl = np.asarray(gt_labels).reshape(-1), np.asarray(pred_labels).reshape(-1)
  if gl.shape[0] != gt.shape[0] or pl.shape[0] != pb.shape[0]:
    raise ValueError("labels and boxes differ in length")
  matched = np.zeros((gt.shape[0],), bool)
  if gt.shape[0] == 0 or pb.shape[0] == 0:
    return matched
  order = np.arange(pb.shape[0]) if pred_scores is None else np.argsort(
      -np.asarray(pred_scores, np.float64), kind="stable")
  ious = iou_matrix(pb, gt)
  for i in order:
    cand = np.where((gl == pl[i]) & ~matched & (ious[i] >= iou_threshold), ious[i], -1.0)
    j = int(np.argmax(cand))
    if cand[j] >= 0:
      matched[j] = True
  return matched


def detection_recall(gt_boxes: Sequence, gt_labels: Sequence, pred_boxes: Sequence,
                     pred_labels: Sequence, pred_scores: Sequence | None = None,
                     iou_threshold: float = 0.5, one_to_one: bool = True) -> RecallResult:
  """Dataset detection recall (per-image lists of boxes [N, 4] xyxy and labels [N])."""
  n = len(gt_boxes)
  if not n == len(gt_labels) == len(pred_boxes) == len(pred_labels):
    raise ValueError("gt_boxes, gt_labels, pred_boxes and pred_labels need one entry per image")
  per = []
  for k in range(n):
    if one_to_one:
      m = match_detections(gt_boxes[k], gt_labels[k], pred_boxes[k], pred_labels[k],
                           None if pred_scores is None else pred_scores[k], iou_threshold)
    else:
      g, gl = _boxes(gt_boxes[k], "gt_boxes"), np.asarray(gt_labels[k]).reshape(-1)
      p, pl = _boxes(pred_boxes[k], "pred_boxes"), np.asarray(pred_labels[k]).reshape(-1)
      m = np.zeros((g.shape[0],), bool)
      if g.shape[0] and p.shape[0]:
        m = ((iou_matrix(g, p) >= iou_threshold) & (gl[:, None] == pl[None, :])).any(axis=1)
    per.append((int(m.sum()), int(m.shape[0])))
  return _summarise(per)
