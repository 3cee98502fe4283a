"""Greedy non-maximum suppression identical to `torchvision.ops.nms` (CPU kernel).

The rule: boxes are sorted by descending score (stable: ties keep input order, as torch's CPU
sort does), then each kept box suppresses every later box whose IoU with it is strictly greater
than the threshold. IoU is `chatrex_jax.ops.boxes.pairwise_iou` (no +1) in the boxes' dtype,
as torchvision's kernel computes in the tensor's dtype, and compared with the threshold as C++
does: the float IoU promoted to the double threshold.

* `nms` (host, numpy): the reference-exact version used by the UPN filter and the data
  engine's grounding backend. float64 boxes / scores stay float64, anything else is float32.
* `nms_fixed` (jax, jit-able): the same greedy rule on a fixed number of boxes with a validity
  mask, returning a keep mask (float32).

Both build the full [N, N] IoU matrix: O(N^2) memory (N = 900 for UPN: 3 MB in float32).

One difference from torchvision, for thresholds < 0 only: torchvision's IoU of two zero-area
boxes is 0/0 = nan, never above a threshold, so the later one survives a negative threshold;
here that IoU is 0 (the library's convention) and it is suppressed like every other box. For
thresholds >= 0 the kept indices are identical.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from chatrex_jax.ops.boxes import pairwise_iou

if TYPE_CHECKING:  # jax itself is imported by `nms_fixed` only: the host `nms` runs without it
  import jax


def _check(boxes, scores):
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes must be [N, 4] xyxy, got shape {boxes.shape}")
  if scores.shape != boxes.shape[:1]:
    raise ValueError(f"scores must be [N] = [{boxes.shape[0]}], got shape {scores.shape}")


def _kernel_dtype(x) -> np.dtype:
  """torchvision computes in the tensor's dtype; float64 stays, the rest is float32."""
  return np.dtype(np.float64) if np.asarray(x).dtype == np.float64 else np.dtype(np.float32)


def _threshold_in(dtype, iou_threshold: float):
  """The largest `dtype` value <= iou_threshold: for any IoU of that dtype,
  iou > result  <=>  float64(iou) > iou_threshold (C++'s promotion to the double)."""
  thr = np.asarray(iou_threshold, dtype)
  if float(thr) > float(iou_threshold):
    thr = np.nextafter(thr, np.asarray(-np.inf, dtype))
  return thr


def _suppresses(boxes_sorted, iou_threshold: float):
  """[N, N] bool: row i suppresses column j (IoU > threshold), boxes sorted by score."""
  iou = pairwise_iou(boxes_sorted, boxes_sorted)
  return iou > _threshold_in(iou.dtype, iou_threshold)


def nms(boxes, scores, iou_threshold: float) -> np.ndarray:
  """boxes [N, 4] xyxy, scores [N] -> int64 indices of the kept boxes, by decreasing score."""
  boxes = np.asarray(boxes, _kernel_dtype(boxes))
  scores = np.asarray(scores, _kernel_dtype(scores))
  _check(boxes, scores)
  order = np.argsort(-scores, kind="stable")
  suppresses = _suppresses(boxes[order], iou_threshold)
  suppressed = np.zeros(len(order), bool)
  keep = []
  for pos in range(len(order)):
    if suppressed[pos]:
      continue
    keep.append(pos)
    # Marks earlier positions too (they are decided already) and the box itself: harmless.
    suppressed |= suppresses[pos]
  return order[np.asarray(keep, np.int64)]


def nms_fixed(boxes: jax.Array, scores: jax.Array, iou_threshold: float,
              valid: jax.Array | None = None) -> jax.Array:
  """Jit-able greedy NMS with static shapes.

  boxes [N, 4] xyxy, scores [N], valid [N] bool (False = ignore, e.g. below a score threshold).
  returns keep [N] bool in the input order; the kept set equals `nms(boxes[valid], ...)`.
  """
  import jax  # here, not at the top: host users of `nms` (the data engine) never load jax
  import jax.numpy as jnp
  n = boxes.shape[0]
  boxes = jnp.asarray(boxes, jnp.float32)
  if valid is None:
    valid = jnp.ones((n,), bool)
  order = jnp.argsort(-scores, stable=True)
  v = valid[order]
  later = jnp.arange(n)[None, :] > jnp.arange(n)[:, None]
  suppress_rows = _suppresses(boxes[order], iou_threshold) & later

  def body(i, state):
    keep, suppressed = state
    k = v[i] & ~suppressed[i]
    keep = keep.at[i].set(k)
    suppressed = suppressed | (k & suppress_rows[i])
    return keep, suppressed

  keep_sorted, _ = jax.lax.fori_loop(0, n, body, (jnp.zeros((n,), bool), jnp.zeros((n,), bool)))
  return jnp.zeros((n,), bool).at[order].set(keep_sorted)
