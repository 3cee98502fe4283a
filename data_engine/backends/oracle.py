"""SYNTHETIC-SCENES ORACLE backends: they read the scene ground truth from the item's
metadata (`meta["scene"]`, added by the `synthetic` source) and answer exactly.

For tests and the demo only -- they raise on any item that is not a synthetic scene, so
they can never silently label real images.
"""
from __future__ import annotations

import numpy as np

from chatrex_jax.ops import boxes as box_ops
from data_engine import synthetic
from data_engine.backends.base import Box, GroundingBackend, VerifierBackend, VisionLanguageBackend

VERSION = "synthetic-scenes-1"
_STOP = {"a", "an", "the", "of", "on", "in", "with", "its", "and"}


def _scene(meta: dict) -> dict:
  scene = meta.get("scene")
  if scene is None:
    raise ValueError("oracle backends only label synthetic scenes (no meta['scene'])")
  return scene


def match_box(scene: dict, box: Box) -> tuple[int, bool]:
  """(object id, is_part) of the scene element with the best IoU to `box` (the first of ties)."""
  elements, boxes = [], []
  for o in scene["objects"]:
    elements.append((o["id"], False))
    boxes.append(o["box"])
    if o["part"]:
      elements.append((o["id"], True))
      boxes.append(o["part"]["box"])
  best, arg = -1.0, (0, False)
  if elements:
    iou = box_ops.pairwise_iou(np.asarray(boxes, np.float64), np.asarray([box], np.float64))[:, 0]
    k = int(np.argmax(iou))
    best, arg = float(iou[k]), elements[k]
  if best < 0.5:
    raise ValueError(f"box {box} matches no scene element (best IoU {best:.2f})")
  return arg


class OracleVisionLanguage(VisionLanguageBackend):
  name = "oracle-vlm"
  version = VERSION

  def caption(self, images, metas):
    return [synthetic.caption(_scene(m)) for m in metas]

  def describe_regions(self, images, boxes, phrases, metas):
    out = []
    for box, m in zip(boxes, metas):
      scene = _scene(m)
      obj, part = match_box(scene, box)
      out.append(synthetic.describe(scene, obj, part))
    return out

  def answer(self, images, questions, metas):
    return [synthetic.answer(_scene(m), q) for q, m in zip(questions, metas)]


class OracleGrounding(GroundingBackend):
  """Phrase -> boxes of every scene element whose attributes the phrase names."""
  name = "oracle-grounding"
  version = VERSION

  def ground(self, images, phrases, metas):
    out = []
    for phrase, m in zip(phrases, metas):
      scene = _scene(m)
      words = set(phrase.lower().replace(",", " ").split()) - _STOP
      words |= {w[:-1] for w in words if w.endswith("s")}  # plurals
      hits: list[tuple[Box, float]] = []
      if synthetic.PART in words:
        for o in scene["objects"]:
          if o["part"] is not None:
            hits.append(([float(v) for v in o["part"]["box"]], 1.0))
      else:
        for o in scene["objects"]:
          if o["shape"] not in words:
            continue
          if words & set(synthetic.COLORS) and o["color"] not in words:
            continue
          if words & set(synthetic.SIZES) and o["size"] not in words:
            continue
          hits.append(([float(v) for v in o["box"]], 1.0))
      out.append(hits)
    return out


class OracleVerifier(VerifierBackend):
  """verify: 1.0 iff every content word of the phrase occurs in the description.
  rewrite: the scene's shortest unique referring expression for the region."""
  name = "oracle-verifier"
  version = VERSION

  def verify(self, phrases, descriptions, metas):
    out = []
    for p, d in zip(phrases, descriptions):
      want = set(p.lower().split()) - _STOP
      have = set(d.lower().replace(",", " ").split())
      out.append(1.0 if want <= have else 0.0)
    return out

  def rewrite(self, phrases, descriptions, boxes, metas):
    out = []
    for box, m in zip(boxes, metas):
      scene = _scene(m)
      obj, part = match_box(scene, box)
      out.append(synthetic.referring_expression(scene, obj, part))
    return out


