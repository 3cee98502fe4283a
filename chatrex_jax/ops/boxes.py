"""Box conversions and overlaps (jnp; also accept numpy). Boxes are [..., 4], last axis coords.

IoU follows torchvision: area = (x2 - x1) * (y2 - y1), no +1. `pairwise_iou_host` is the
float64 numpy twin for host-side code (data sampling, evaluation), where a jnp call per sample
would dispatch to the device.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def cxcywh_to_xyxy(b):
  cx, cy, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(b):
  x1, y1, x2, y2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
  return jnp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def area(b):
  return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def pairwise_iou(a, b, return_union: bool = False):
  """a [..., N, 4], b [..., M, 4] xyxy -> IoU [..., N, M] (and the union if asked)."""
  lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
  rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = area(a)[..., :, None] + area(b)[..., None, :] - inter
  iou = inter / union
  return (iou, union) if return_union else iou


def pairwise_iou_host(a, b) -> np.ndarray:
  """numpy float64 IoU of xyxy boxes a [N, 4] x b [M, 4] -> [N, M]; 0 where boxes do not
  overlap (also for empty / degenerate boxes, instead of 0/0)."""
  a = np.asarray(a, np.float64).reshape(-1, 4)
  b = np.asarray(b, np.float64).reshape(-1, 4)
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = np.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area(a)[:, None] + area(b)[None, :] - inter
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(inter > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def pairwise_giou(a, b):
  """Generalized IoU [..., N, M] of xyxy boxes (DETR's definition)."""
  iou, union = pairwise_iou(a, b, return_union=True)
  lt = jnp.minimum(a[..., :, None, :2], b[..., None, :, :2])
  rb = jnp.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  hull = wh[..., 0] * wh[..., 1]
  return iou - (hull - union) / hull
