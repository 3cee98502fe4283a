"""The project's one box library: conversions, areas and overlaps, for numpy and jnp alike.

Conventions (every caller relies on them):

* Boxes are arrays [..., 4] with the coordinates on the last axis. `xyxy` = (x1, y1, x2, y2)
  corners, `xywh` = (x1, y1, width, height) (COCO), `cxcywh` = (centre x, centre y, width,
  height) (DETR). Pixels of the image unless a caller says "normalised" (then [0, 1] of W, H).
* Continuous coordinates, **no +1**: width = x2 - x1, area = (x2 - x1) * (y2 - y1), as
  torchvision's `box_area` / `box_iou`, pycocotools and the RexSeek metrics.
* IoU / GIoU of degenerate pairs is 0, never nan: wherever the union (the enclosing box for
  GIoU) has no positive area the quotient is 0. Boxes that do not overlap with a positive area
  (disjoint, touching, zero-area or inverted) therefore have IoU 0. Wherever the union is
  positive the value is exactly torchvision's arithmetic, and under jax the gradient is the
  plain quotient's (the guards only select; XLA may round the summed gradient differently).
* `area` is the signed product (an inverted box has a negative or positive "area", as in
  torchvision); only the overlaps are made safe.

Array backend and dtypes:

* A jax array (a tracer inside `jit` too) in any argument selects `jax.numpy`; anything else
  (numpy arrays, lists, python numbers) is computed with numpy on the host. jax is never
  imported here: host-only users (data engine, evaluation) do not pay for it, and a jax array
  exists only once jax is loaded.
* `dtype=None` keeps a floating input dtype (float32 stays float32: jit code and the official
  float32 box arithmetic of the processor); integer, bool and python inputs become float64 on
  the host and jax's default float under jax. Pass `dtype=np.float64` for host evaluation in
  double precision; float64 numpy reproduces python-float arithmetic bit for bit, operation by
  operation.
"""
from __future__ import annotations

import sys

import numpy as np


def _namespace(*arrays):
  """`jax.numpy` when any argument is a jax array (tracers included), else `numpy`."""
  jax = sys.modules.get("jax")
  if jax is not None and any(isinstance(a, jax.Array) for a in arrays):
    return jax.numpy
  return np


def _as_boxes(xp, boxes, dtype):
  """boxes as an `xp` float array [..., 4] in `dtype` (None: see the module docstring)."""
  b = xp.asarray(boxes, dtype)
  if dtype is None and not xp.issubdtype(b.dtype, xp.floating):
    b = b.astype(np.float64 if xp is np else xp.result_type(float))
  if b.shape[-1:] != (4,):
    raise ValueError(f"boxes must be [..., 4], got shape {b.shape}")
  return b


def _prepare(boxes, dtype):
  xp = _namespace(boxes)
  return xp, _as_boxes(xp, boxes, dtype)


def _prepare_pair(a, b, dtype):
  xp = _namespace(a, b)
  return xp, _as_boxes(xp, a, dtype), _as_boxes(xp, b, dtype)


def _safe_divide(xp, numerator, denominator):
  """numerator / denominator where denominator > 0, else 0. The inner `where` keeps 0/0 out of
  the computation, so the gradient is finite too (and unchanged where denominator > 0)."""
  positive = denominator > 0
  return xp.where(positive, numerator / xp.where(positive, denominator, 1), 0)


# ------------------------------------------------------------------------------------------
# Conversions: [..., 4] -> [..., 4], same dtype as the (float) input.


def xyxy_to_xywh(boxes, *, dtype=None):
  """[..., 4] xyxy -> [..., 4] xywh (width = x2 - x1)."""
  xp, b = _prepare(boxes, dtype)
  return xp.concatenate([b[..., :2], b[..., 2:] - b[..., :2]], axis=-1)


def xywh_to_xyxy(boxes, *, dtype=None):
  """[..., 4] xywh -> [..., 4] xyxy (x2 = x1 + width)."""
  xp, b = _prepare(boxes, dtype)
  return xp.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], axis=-1)


def cxcywh_to_xyxy(boxes, *, dtype=None):
  """[..., 4] cxcywh -> [..., 4] xyxy (x1 = cx - 0.5 * w)."""
  xp, b = _prepare(boxes, dtype)
  cx, cy, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
  return xp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes, *, dtype=None):
  """[..., 4] xyxy -> [..., 4] cxcywh (cx = (x1 + x2) / 2)."""
  xp, b = _prepare(boxes, dtype)
  x1, y1, x2, y2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
  return xp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


# ------------------------------------------------------------------------------------------
# Areas and overlaps of xyxy boxes.


def area(boxes, *, dtype=None):
  """[..., 4] xyxy -> [...] (x2 - x1) * (y2 - y1), signed (not clipped), no +1."""
  _, b = _prepare(boxes, dtype)
  return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def _pair_coordinates(a, b):
  """x1, y1, x2, y2 of a as [..., N, 1] and of b as [..., 1, M]. Separate coordinate planes
  instead of [..., N, M, 2] corner arrays: numpy is ~5x faster on them (N = M = 900)."""
  return ([a[..., :, None, k] for k in range(4)], [b[..., None, :, k] for k in range(4)])


def _intersection(xp, a, b):
  (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = _pair_coordinates(a, b)
  w = xp.minimum(ax2, bx2) - xp.maximum(ax1, bx1)
  h = xp.minimum(ay2, by2) - xp.maximum(ay1, by1)
  return xp.clip(w, 0, None) * xp.clip(h, 0, None)


def pairwise_intersection(a, b, *, dtype=None):
  """Overlap areas of xyxy boxes a [..., N, 4] x b [..., M, 4] -> [..., N, M] (>= 0)."""
  xp, a, b = _prepare_pair(a, b, dtype)
  return _intersection(xp, a, b)


def pairwise_iou(a, b, *, dtype=None, return_union: bool = False):
  """IoU of xyxy boxes a [..., N, 4] x b [..., M, 4] -> [..., N, M] (and the union if asked).

  IoU = intersection / (area(a) + area(b) - intersection); 0 where that union is not positive
  (zero-area or inverted pairs), so never nan (module docstring).
  """
  xp, a, b = _prepare_pair(a, b, dtype)
  inter = _intersection(xp, a, b)
  union = area(a)[..., :, None] + area(b)[..., None, :] - inter
  iou = _safe_divide(xp, inter, union)
  return (iou, union) if return_union else iou


def pairwise_giou(a, b, *, dtype=None):
  """Generalized IoU (DETR / torchvision) of xyxy boxes a [..., N, 4] x b [..., M, 4] ->
  [..., N, M]: IoU - (hull - union) / hull, hull = area of the smallest enclosing box; the
  second term is 0 where the hull has no positive area (two degenerate boxes on one line)."""
  xp, a, b = _prepare_pair(a, b, dtype)
  iou, union = pairwise_iou(a, b, return_union=True)
  (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = _pair_coordinates(a, b)
  w = xp.maximum(ax2, bx2) - xp.minimum(ax1, bx1)
  h = xp.maximum(ay2, by2) - xp.minimum(ay1, by1)
  hull = xp.clip(w, 0, None) * xp.clip(h, 0, None)
  return iou - _safe_divide(xp, hull - union, hull)
