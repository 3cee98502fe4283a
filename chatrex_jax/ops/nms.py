"""Greedy non-maximum suppression identical to `torchvision.ops.nms` (CPU kernel).

* `nms` (host, numpy): the reference-exact version used by the UPN filter. Boxes are sorted by
  descending score (stable: ties keep input order, as torch's CPU sort does), then each kept
  box suppresses every later box whose IoU with it is strictly greater than the threshold.
  IoU is computed in float32 with area = (x2 - x1) * (y2 - y1) (no +1), exactly as the
  torchvision kernel, and compared with the threshold in float64 (C++ promotes the float IoU
  to the double threshold).
* `nms_fixed` (jax, jit-able): the same greedy rule on a fixed number of boxes with a validity
  mask, returning a keep mask; O(N^2) memory (N = 900 for UPN: 3 MB).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _check(boxes, scores):
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes must be [N, 4] xyxy, got shape {boxes.shape}")
  if scores.shape != boxes.shape[:1]:
    raise ValueError(f"scores must be [N] = [{boxes.shape[0]}], got shape {scores.shape}")


def nms(boxes, scores, iou_threshold: float) -> np.ndarray:
  """boxes [N, 4] xyxy, scores [N] -> int64 indices of the kept boxes, by decreasing score."""
  boxes = np.asarray(boxes, np.float32)
  scores = np.asarray(scores, np.float32)
  _check(boxes, scores)
  if boxes.shape[0] == 0:
    return np.zeros((0,), np.int64)
  x1, y1, x2, y2 = boxes.T
  areas = (x2 - x1) * (y2 - y1)
  order = np.argsort(-scores, kind="stable")
  suppressed = np.zeros(boxes.shape[0], bool)
  keep = []
  thr = float(iou_threshold)
  for pos, i in enumerate(order):
    if suppressed[i]:
      continue
    keep.append(i)
    rest = order[pos + 1:]
    if rest.size == 0:
      break
    xx1 = np.maximum(x1[i], x1[rest])
    yy1 = np.maximum(y1[i], y1[rest])
    xx2 = np.minimum(x2[i], x2[rest])
    yy2 = np.minimum(y2[i], y2[rest])
    w = np.maximum(np.float32(0), xx2 - xx1)
    h = np.maximum(np.float32(0), yy2 - yy1)
    inter = w * h
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 for empty boxes: NaN, never > thr
      ovr = inter / (areas[i] + areas[rest] - inter)
      suppressed[rest[ovr.astype(np.float64) > thr]] = True
  return np.asarray(keep, np.int64)


def nms_fixed(boxes: jnp.ndarray, scores: jnp.ndarray, iou_threshold: float,
              valid: jnp.ndarray | None = None) -> jnp.ndarray:
  """Jit-able greedy NMS with static shapes.

  boxes [N, 4] xyxy, scores [N], valid [N] bool (False = ignore, e.g. below a score threshold).
  returns keep [N] bool in the input order; the kept set equals `nms(boxes[valid], ...)`.
  """
  n = boxes.shape[0]
  boxes = boxes.astype(jnp.float32)
  if valid is None:
    valid = jnp.ones((n,), bool)
  order = jnp.argsort(-scores, stable=True)
  b = boxes[order]
  v = valid[order]
  area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  lt = jnp.maximum(b[:, None, :2], b[None, :, :2])
  rb = jnp.minimum(b[:, None, 2:], b[None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  iou = inter / (area[:, None] + area[None, :] - inter)
  later = jnp.arange(n)[None, :] > jnp.arange(n)[:, None]
  # ovr > thr (float64) <=> ovr > thr rounded down to float32, for any float32 ovr.
  thr32 = np.float32(iou_threshold)
  if float(thr32) > float(iou_threshold):
    thr32 = np.nextafter(thr32, np.float32(-np.inf))
  suppress_rows = (iou > thr32) & later

  def body(i, state):
    keep, suppressed = state
    k = v[i] & ~suppressed[i]
    keep = keep.at[i].set(k)
    suppressed = suppressed | (k & suppress_rows[i])
    return keep, suppressed

  keep_sorted, _ = jax.lax.fori_loop(0, n, body, (jnp.zeros((n,), bool), jnp.zeros((n,), bool)))
  return jnp.zeros((n,), bool).at[order].set(keep_sorted)
