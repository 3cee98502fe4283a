"""COCO-style box AP / AR through pycocotools, COCO / LVIS readers, prediction conversion.

AP / AR are never computed by hand here: `evaluate_boxes` builds `pycocotools.cocoeval.COCOeval`
(iouType "bbox") and returns its 12 summary numbers by name:

  AP (IoU .50:.95), AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl

(-1 where pycocotools has nothing to average, e.g. no small objects). Boxes in COCO results are
xywh in original-image pixels; `to_results` converts xyxy model outputs
(`chatrex_jax.ops.boxes.xyxy_to_xywh`, float64).

ChatRex answers carry no confidence score. `parsed_to_results` gives every box of an answer a
score: "constant" (1.0 for all; AP then depends on pycocotools' stable tie order) or "rank"
(1 - k / (K + 1) for the k-th box of the phrase: earlier indices rank higher).

LVIS: `load_lvis` reads the LVIS v1 JSON (COCO layout plus `synonyms`, `frequency`,
`neg_category_ids`, `not_exhaustive_category_ids`) into a pycocotools COCO object.
`lvis_federated_filter` applies the federated rule that detections of categories neither
verified present nor verified absent in an image are ignored. Limitation: LVIS's other rule
(unmatched detections of a `not_exhaustive` category are not false positives) needs the
matching step and is NOT applied; use the official `lvis` package for leaderboard numbers.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from chatrex_jax.ops import boxes as box_ops

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
              "ARl")


def _coco_cls():
  from pycocotools.coco import COCO
  return COCO


def coco_from_dict(dataset: Mapping[str, Any]):
  """A pycocotools COCO object from an in-memory dataset dict (deep-copied; no printing)."""
  for key in ("images", "annotations", "categories"):
    if key not in dataset:
      raise ValueError(f"COCO dataset dict lacks {key!r} (has {sorted(dataset)})")
  coco = _coco_cls()()
  coco.dataset = copy.deepcopy(dict(dataset))
  for ann in coco.dataset["annotations"]:
    if "bbox" not in ann:
      raise ValueError(f"annotation {ann.get('id')} has no bbox")
    ann.setdefault("iscrowd", 0)
    ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def load_coco(path_or_dict):
  """COCO instances JSON (path) or dict -> pycocotools COCO."""
  if isinstance(path_or_dict, Mapping):
    return coco_from_dict(path_or_dict)
  with open(os.fspath(path_or_dict), encoding="utf-8") as f:
    return coco_from_dict(json.load(f))


def load_lvis(path_or_dict):
  """LVIS v1 JSON -> pycocotools COCO (LVIS annotations have no `iscrowd`: set to 0). The LVIS
  fields (`neg_category_ids`, `not_exhaustive_category_ids` on images; `synonyms`, `frequency`
  on categories) stay in `coco.dataset` / `coco.imgs` / `coco.cats`."""
  coco = load_coco(path_or_dict)
  missing = [i for i, im in coco.imgs.items() if "neg_category_ids" not in im]
  if missing:
    raise ValueError(f"{len(missing)} images lack 'neg_category_ids' (first id {missing[0]}): "
                     "not an LVIS annotation file")
  return coco


def category_names(coco, *, lvis_clean: bool = False) -> dict[int, str]:
  """category id -> name (LVIS: `lvis_clean=True` turns "bow_(weapon)" into "bow (weapon)")."""
  out = {}
  for cid, cat in sorted(coco.cats.items()):
    name = cat["name"]
    out[cid] = name.replace("_", " ") if lvis_clean else name
  return out


def to_results(image_id: int, boxes_xyxy, scores, category_ids) -> list[dict]:
  """COCO result records for one image: boxes [N, 4] xyxy, scores [N], category_ids [N] (or
  one int for all)."""
  b = box_ops.xyxy_to_xywh(np.asarray(boxes_xyxy, np.float64).reshape(-1, 4))
  n = b.shape[0]
  s = np.broadcast_to(np.asarray(scores, np.float64), (n,))
  c = np.broadcast_to(np.asarray(category_ids, np.int64), (n,))
  if not np.all(np.isfinite(b)):
    raise ValueError(f"image {image_id}: non-finite box coordinates")
  return [{"image_id": int(image_id), "category_id": int(c[i]), "bbox": [float(v) for v in b[i]],
           "score": float(s[i])} for i in range(n)]


def normalize_name(name: str) -> str:
  """Lower-case, underscores to spaces, whitespace collapsed (phrase <-> category matching)."""
  return " ".join(str(name).replace("_", " ").lower().split())


def parsed_to_results(image_id: int, phrases: Iterable, name_to_category: Mapping[str, int], *,
                      score: str = "rank") -> tuple[list[dict], list[str]]:
  """Converts parsed ChatRex phrases (`parser.GroundedPhrase`, or dicts with "phrase" and
  "boxes" xyxy) to COCO results. Phrases are matched to categories by `normalize_name`.
  Returns (results, unmatched phrases). score: "rank" or "constant" (module doc)."""
  if score not in ("rank", "constant"):
    raise ValueError(f"score must be 'rank' or 'constant', got {score!r}")
  table = {normalize_name(k): v for k, v in name_to_category.items()}
  results, unmatched = [], []
  for p in phrases:
    phrase = p["phrase"] if isinstance(p, Mapping) else p.phrase
    boxes = np.asarray(p["boxes"] if isinstance(p, Mapping) else p.boxes, np.float64).reshape(-1, 4)
    cid = table.get(normalize_name(phrase))
    if cid is None:
      unmatched.append(phrase)
      continue
    k = boxes.shape[0]
    scores = np.ones(k) if score == "constant" else 1.0 - np.arange(k) / (k + 1.0)
    results.extend(to_results(image_id, boxes, scores, cid))
  return results, unmatched


def indices_to_results(image_id: int, per_category: Mapping[int, Sequence[int]], boxes, *,
                       score: str = "rank") -> list[dict]:
  """COCO results from per-category box indices (e.g. `prompts.merge_answers(...).per_category`
  over chunked LVIS prompts) into the image's input boxes [N, 4] xyxy. score: as
  `parsed_to_results`."""
  if score not in ("rank", "constant"):
    raise ValueError(f"score must be 'rank' or 'constant', got {score!r}")
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  out = []
  for cid, idx in per_category.items():
    idx = [int(i) for i in idx]
    bad = [i for i in idx if not 0 <= i < b.shape[0]]
    if bad:
      raise ValueError(f"category {cid}: indices {bad} outside the {b.shape[0]} input boxes")
    if not idx:
      continue
    k = len(idx)
    scores = np.ones(k) if score == "constant" else 1.0 - np.arange(k) / (k + 1.0)
    out.extend(to_results(image_id, b[idx], scores, cid))
  return out


def lvis_federated_filter(lvis_gt, results: Sequence[Mapping]) -> list[dict]:
  """Drops detections whose category is not verified (neither in the image's positive
  annotations nor in its `neg_category_ids`) - the LVIS federated rule (module doc)."""
  verified: dict[int, set] = {}
  for img_id, img in lvis_gt.imgs.items():
    pos = {a["category_id"] for a in lvis_gt.imgToAnns.get(img_id, [])}
    verified[img_id] = pos | set(img.get("neg_category_ids", []))
  return [dict(r) for r in results if r["category_id"] in verified.get(r["image_id"], set())]


def evaluate_boxes(gt, results: Sequence[Mapping], *, max_dets: Sequence[int] = (1, 10, 100),
                   image_ids: Sequence[int] | None = None, category_ids: Sequence[int] | None = None,
                   use_cats: bool = True, verbose: bool = False) -> dict[str, float]:
  """COCO box AP/AR with pycocotools. gt: COCO object, dict or path; results: COCO result
  records (image_id, category_id, bbox xywh, score). Returns {STAT_NAMES[i]: float}, plus
  "num_results". use_cats=False gives class-agnostic numbers (e.g. for proposals)."""
  from pycocotools.cocoeval import COCOeval
  coco_gt = gt if hasattr(gt, "getImgIds") else load_coco(gt)
  known = set(coco_gt.getImgIds())
  bad = [r.get("image_id") for r in results if r.get("image_id") not in known]
  if bad:
    raise ValueError(f"{len(bad)} results refer to images not in the GT (first: {bad[0]!r})")
  for r in results:
    if len(r.get("bbox", ())) != 4:
      raise ValueError(f"result without a 4-number bbox: {dict(r)!r:.200}")
  sink = io.StringIO()
  with contextlib.redirect_stdout(sink):
    if results:
      coco_dt = coco_gt.loadRes([dict(r) for r in results])
    else:  # loadRes refuses an empty list; an empty result set scores 0.
      coco_dt = coco_from_dict({"images": coco_gt.dataset["images"], "annotations": [],
                                "categories": coco_gt.dataset["categories"]})
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    ev.params.maxDets = sorted(int(m) for m in max_dets)
    if len(ev.params.maxDets) != 3:
      raise ValueError("max_dets needs 3 values (pycocotools' summary reads three)")
    if image_ids is not None:
      ev.params.imgIds = list(image_ids)
    if category_ids is not None:
      ev.params.catIds = list(category_ids)
    ev.params.useCats = int(use_cats)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  if verbose:
    print(sink.getvalue())
  out = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
  out["num_results"] = len(results)
  return out


def read_results(path) -> list[dict]:
  """COCO results: a JSON list, or JSON lines of result records."""
  with open(os.fspath(path), encoding="utf-8") as f:
    text = f.read()
  stripped = text.lstrip()
  if stripped.startswith("["):
    return json.loads(stripped)
  return [json.loads(line) for line in text.splitlines() if line.strip()]
