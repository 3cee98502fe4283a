"""RexSeek / HumanRef metrics: precision, recall and DensityF1 (docs/architecture.md D).

Re-implements the *code* of RexSeek `evaluation/recall_precision_densityf1.py`:

* IoU = intersection / union of xyxy boxes, 0 when they do not overlap (no +1):
  `chatrex_jax.ops.boxes.pairwise_iou` in float64. The official code computes it in python
  floats, and float64 numpy performs the same IEEE operations in the same order, so the IoU
  values - and the comparisons with the thresholds below - are bit-identical.
* Matching at threshold t (`match_boxes`): GT boxes are visited in order; each takes the
  **unused** prediction with the highest IoU, provided IoU >= t (and > 0; ties keep the earlier
  prediction). recall = matches / #GT, precision = matches / #pred.
  An empty prediction list, or `[[]]` (the parse-failure / rejection answer), gives (0, 0).
* Box mode thresholds `np.arange(0.5, 1.0, 0.05)` (10 values). Per sample: Recall@0.5,
  Precision@0.5, their means over the thresholds, DensityF1@0.5 and its mean over thresholds.
* DensityF1 = F1 * penalty, F1 = 2PR / (P + R) (0 when P + R = 0),
  penalty = min(1, (#GT / #cand) / (#pred / #cand)) = min(1, #GT / #pred) when the image has
  candidates (#cand > 0) and #pred > 0, else 0. #pred counts the prediction *list* (so `[[]]`
  counts 1, but its F1 is 0 anyway).

  README discrepancy: the HumanRef README describes the penalty's numerator as the total number
  of persons in the image; the code divides both #GT and #pred by that total, so it cancels and
  only decides whether the penalty is 0 (no candidates). We implement the code.
* Point mode (decided, as the code does, by the first prediction of the *first prediction
  record* having 2 numbers): a GT mask (COCO RLE, field `answer_segmentations`) is matched by
  the first unused point inside it after rounding (`int(round(x))`, `int(round(y))`, in-bounds).
  No GT and no points -> (1, 1); no GT -> (0, 0); no points -> recall 0, precision 1.
  Deliberate difference: in point mode `[[]]` is treated as "no points" (the official code
  would raise an IndexError on `point[0]`).
* Rejection domain (`domain == "rejection"`): skipped from every other metric. The Rejection
  Score is the **absolute count** of rejection samples whose prediction is empty or starts with
  an empty list (not a rate).
* A non-rejection sample with no GT box: the official `calculate_metrics` returns the malformed
  3-tuple `(1.0, 1.0 if no preds else 0.0, 0.0)` and the caller crashes while unpacking it; we
  raise a ValueError naming the sample instead.
* Aggregation: mean of the per-sample metrics grouped by domain, subdomain and GT-count bucket
  ("1", "2-5", "6-10", ">10"; note the official bucket function maps 0 to ">10"). "Average /
  All Data" is the mean over all non-rejection samples pooled (not a mean of domain means).
  Rows of several models are sorted by DensityF1@0.5:0.95 (point mode: DensityF1@Point).
* A GT sample with no prediction record counts as an empty prediction.
"""
from __future__ import annotations

from collections import defaultdict
import dataclasses
import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from chatrex_jax.ops import boxes as box_ops

THRESHOLDS = np.arange(0.5, 1.0, 0.05)  # exactly the official array (10 values)
BUCKET_ORDER = ("1", "2-5", "6-10", ">10")
REJECTION_DOMAIN = "rejection"

BOX_KEYS = ("recall_50", "precision_50", "recall_mean", "precision_mean", "density_f1_50",
            "density_f1_mean")
POINT_KEYS = ("recall", "precision", "density_f1")


def is_empty_prediction(pred: Sequence) -> bool:
  """`[]` or a list whose first element is empty (`[[]]`): the rejection / failure answer."""
  return len(pred) == 0 or len(pred[0]) == 0


def match_boxes(gt_boxes: Sequence[Sequence[float]], pred_boxes: Sequence[Sequence[float]],
                iou_threshold: float = 0.5) -> tuple[float, float]:
  """(recall, precision) of one sample at one IoU threshold (box mode; see module doc).

  gt_boxes: [G, 4] xyxy, G >= 1. pred_boxes: [P, 4] xyxy, or [] / [[]].
  """
  if len(gt_boxes) == 0:
    raise ValueError("match_boxes needs at least one GT box (the official empty-GT branch is "
                     "malformed; empty-GT samples belong to the rejection domain)")
  if is_empty_prediction(pred_boxes):
    return 0.0, 0.0
  ious = box_ops.pairwise_iou(gt_boxes, pred_boxes, dtype=np.float64)  # [G, P]
  unused = np.ones(len(pred_boxes), bool)
  for row in ious:
    # The best unused prediction with IoU >= t and > 0; argmax keeps the earliest of ties.
    candidates = np.where(unused & (row >= iou_threshold), row, 0.0)
    best = int(np.argmax(candidates))
    if candidates[best] > 0:
      unused[best] = False
  matches = int((~unused).sum())
  return matches / len(gt_boxes), matches / len(pred_boxes)


def point_in_mask(point: Sequence[float], rle: Mapping[str, Any]) -> bool:
  """Whether (x, y), rounded, falls inside a COCO RLE mask ({"size": [h, w], "counts": ...})."""
  from pycocotools import mask as mask_utils
  rle = dict(rle)
  if isinstance(rle.get("counts"), str):
    rle["counts"] = rle["counts"].encode("ascii")
  elif isinstance(rle.get("counts"), list):  # uncompressed RLE
    h, w = rle["size"]
    rle = mask_utils.frPyObjects(rle, h, w)
  import warnings
  with warnings.catch_warnings():  # pycocotools' own NumPy-2 copy= deprecation notice
    warnings.simplefilter("ignore", DeprecationWarning)
    m = mask_utils.decode(rle)
  h, w = m.shape[:2]
  x, y = int(round(point[0])), int(round(point[1]))
  return bool(0 <= x < w and 0 <= y < h and m[y, x] == 1)


def match_points(gt_masks: Sequence[Mapping], pred_points: Sequence[Sequence[float]],
                 num_gt: int | None = None) -> tuple[float, float]:
  """(recall, precision) in point mode. gt_masks: COCO RLEs (one per GT box); num_gt: #GT boxes
  (defaults to len(gt_masks)); pred_points: [P, 2] (x, y), `[]` or `[[]]`."""
  n_gt = len(gt_masks) if num_gt is None else num_gt
  points = [] if is_empty_prediction(pred_points) else list(pred_points)
  if n_gt == 0 and not points:
    return 1.0, 1.0
  if n_gt == 0:
    return 0.0, 0.0
  if not points:
    return 0.0, 1.0
  matches, used = 0, set()
  for mask in gt_masks:
    for i, p in enumerate(points):
      if i in used:
        continue
      if point_in_mask(p, mask):
        matches += 1
        used.add(i)
        break
  return matches / n_gt, matches / len(points)


def density_f1(precision: float, recall: float, gt_count: int, pred_count: int,
               total_candidates: int) -> float:
  """F1 * min(1, #GT / #pred); 0 when P + R = 0, #pred = 0 or the image has no candidates."""
  if precision + recall == 0:
    return 0.0
  f1 = 2 * precision * recall / (precision + recall)
  gt_ratio = gt_count / total_candidates if total_candidates > 0 else 0.0
  pred_ratio = pred_count / total_candidates if total_candidates > 0 else 0.0
  penalty = min(1.0, gt_ratio / pred_ratio) if pred_ratio > 0 else 0.0
  return f1 * penalty


def box_count_bucket(count: int) -> str:
  """"1", "2-5", "6-10" or ">10" (the official function sends 0 to ">10" too)."""
  if count == 1:
    return "1"
  if 2 <= count <= 5:
    return "2-5"
  if 6 <= count <= 10:
    return "6-10"
  return ">10"


def sample_metrics(gt_boxes, pred, total_candidates: int, *, point_mode: bool = False,
                   gt_masks=None) -> dict[str, float]:
  """Per-sample metrics. Box mode -> BOX_KEYS; point mode -> POINT_KEYS (plus counts)."""
  if point_mode:
    if gt_masks is None:
      raise ValueError("point mode needs the GT masks (`answer_segmentations`)")
    r, p = match_points(gt_masks, pred, num_gt=len(gt_boxes))
    n_pred = 0 if is_empty_prediction(pred) else len(pred)
    return {"recall": r, "precision": p,
            "density_f1": density_f1(p, r, len(gt_boxes), n_pred, total_candidates),
            "num_pred": n_pred, "num_gt": len(gt_boxes)}
  rs, ps, fs = [], [], []
  for t in THRESHOLDS:
    r, p = match_boxes(gt_boxes, pred, t)
    rs.append(r)
    ps.append(p)
    fs.append(density_f1(p, r, len(gt_boxes), len(pred), total_candidates))
  r50, p50 = match_boxes(gt_boxes, pred, 0.5)
  return {"recall_50": r50, "precision_50": p50, "recall_mean": float(np.mean(rs)),
          "precision_mean": float(np.mean(ps)),
          "density_f1_50": density_f1(p50, r50, len(gt_boxes), len(pred), total_candidates),
          "density_f1_mean": float(np.mean(fs)), "num_pred": len(pred), "num_gt": len(gt_boxes)}


@dataclasses.dataclass
class DatasetResult:
  """Per-group lists of per-sample metric dicts, plus the rejection count."""
  domain: dict[str, list[dict]]
  subdomain: dict[str, list[dict]]
  box_count: dict[str, list[dict]]
  subdomain_parent: dict[str, str]
  is_point: bool
  rejection_score: int
  rejection_total: int

  @property
  def keys(self) -> tuple[str, ...]:
    return POINT_KEYS if self.is_point else BOX_KEYS

  def mean(self, rows: Sequence[dict]) -> dict[str, float]:
    out = {k: float(np.mean([r[k] for r in rows])) for k in self.keys}
    out["count"] = len(rows)
    return out

  def all_samples(self) -> list[dict]:
    return [r for rows in self.domain.values() for r in rows]

  def summary(self) -> dict[str, Any]:
    """{"average": pooled means, "domain": {...}, "subdomain": {...}, "box_count": {...},
    "rejection_score": int, "rejection_total": int, "is_point": bool}."""
    allrows = self.all_samples()
    return {
        "is_point": self.is_point,
        "average": self.mean(allrows) if allrows else {"count": 0},
        "domain": {d: self.mean(v) for d, v in sorted(self.domain.items())},
        "subdomain": {s: dict(self.mean(v), domain=self.subdomain_parent[s])
                      for s, v in sorted(self.subdomain.items())},
        "box_count": {b: self.mean(self.box_count[b]) for b in BUCKET_ORDER
                      if b in self.box_count},
        "rejection_score": self.rejection_score,
        "rejection_total": self.rejection_total,
    }


def _predictions_by_id(pred_data: Iterable[Mapping]) -> tuple[dict, list]:
  lookup, order = {}, []
  for item in pred_data:
    if "id" not in item or "extracted_predictions" not in item:
      raise ValueError(f"prediction record lacks 'id' / 'extracted_predictions': {dict(item)!r:.200}")
    lookup[item["id"]] = item["extracted_predictions"]
    order.append(item)
  return lookup, order


def detect_point_mode(pred_data: Sequence[Mapping]) -> bool:
  """Official rule: the first record's first prediction has 2 numbers. (An empty first list,
  on which the official code raises, counts as box mode.)"""
  if not pred_data:
    return False
  first = pred_data[0]["extracted_predictions"]
  return len(first) > 0 and len(first[0]) == 2


def evaluate_dataset(gt_data: Sequence[Mapping], pred_data: Sequence[Mapping], *,
                     point_mode: bool | None = None) -> DatasetResult:
  """The official `evaluate_dataset`. gt_data: annotation records (id, domain, sub_domain,
  answer_boxes [xyxy], candidate_boxes, answer_segmentations in point mode); pred_data: records
  with id and extracted_predictions. point_mode: None = the official auto-detection."""
  lookup, order = _predictions_by_id(pred_data)
  is_point = detect_point_mode(order) if point_mode is None else point_mode
  domain, subdomain, buckets = defaultdict(list), defaultdict(list), defaultdict(list)
  parent: dict[str, str] = {}
  rej_score = rej_total = 0
  for gt in gt_data:
    for field in ("id", "domain", "sub_domain", "answer_boxes", "candidate_boxes"):
      if field not in gt:
        raise ValueError(f"annotation record lacks {field!r}: {dict(gt)!r:.200}")
    pred = lookup.get(gt["id"], [])
    if gt["domain"] == REJECTION_DOMAIN:
      rej_total += 1
      if is_empty_prediction(pred):
        rej_score += 1
      continue
    gt_boxes = gt["answer_boxes"]
    if len(gt_boxes) == 0:
      raise ValueError(f"sample {gt['id']!r} (domain {gt['domain']!r}) has no answer_boxes; only "
                       "the rejection domain may be empty (the official code crashes here)")
    m = sample_metrics(gt_boxes, pred, len(gt["candidate_boxes"]), point_mode=is_point,
                       gt_masks=gt.get("answer_segmentations"))
    m["id"] = gt["id"]
    domain[gt["domain"]].append(m)
    subdomain[gt["sub_domain"]].append(m)
    # Official: a subdomain's domain is that of its first GT sample.
    parent.setdefault(gt["sub_domain"], gt["domain"])
    buckets[box_count_bucket(len(gt_boxes))].append(m)
  return DatasetResult(dict(domain), dict(subdomain), dict(buckets), parent, is_point,
                       rej_score, rej_total)


# -- tables -------------------------------------------------------------------------------

_HEAD_BOX = ("Recall@0.5", "Recall@0.5:0.95", "Precision@0.5", "Precision@0.5:0.95",
             "DensityF1@0.5", "DensityF1@0.5:0.95")
_HEAD_POINT = ("Recall@Point", "Precision@Point", "DensityF1@Point")


def _sort_key(row: Mapping) -> float:
  return row["density_f1"] if "density_f1" in row else row.get("density_f1_mean", 0.0)


_BOX_ORDER = ("recall_50", "recall_mean", "precision_50", "precision_mean", "density_f1_50",
              "density_f1_mean")


def _cells(m: Mapping, with_point: bool, with_box: bool) -> list[str]:
  """Table cells: point columns then box columns (each only when some model has that mode);
  a model fills the columns of its own mode, the others stay empty ("-" without samples)."""
  is_point = "density_f1" in m or ("recall" in m and "recall_50" not in m)
  out = []
  for mode, keys, wanted in ((True, POINT_KEYS, with_point), (False, _BOX_ORDER, with_box)):
    if not wanted:
      continue
    if not m.get("count"):
      out += ["-"] * len(keys)
    elif mode == is_point:
      out += [f"{m[k]:.3f}" for k in keys]
    else:
      out += [""] * len(keys)
  return out


def _md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def comparison_tables(results: Mapping[str, DatasetResult]) -> tuple[str, dict]:
  """Markdown + JSON of several models' results (the official comparison layout: per domain
  an "Overall" row then its subdomains, models sorted by DensityF1@0.5:0.95 within each group;
  then "Average / All Data" and the rejection count; a second table by GT-count bucket)."""
  with_point = any(r.is_point for r in results.values())
  with_box = any(not r.is_point for r in results.values())
  head_metrics = (_HEAD_POINT if with_point else ()) + (_HEAD_BOX if with_box else ())
  headers = ["Domain", "Subdomain", "Model", *head_metrics, "Samples"]
  rows, jrows = [], []

  def add(group: str, sub: str, per_model: dict[str, dict]):
    for name, m in sorted(per_model.items(), key=lambda kv: -_sort_key(kv[1])):
      rows.append([group, sub, name, *_cells(m, with_point, with_box), m.get("count", 0)])
      jrows.append({"domain": group, "subdomain": sub, "model": name, **m})

  summaries = {name: r.summary() for name, r in results.items()}
  domains = sorted({d for s in summaries.values() for d in s["domain"]})
  for d in domains:
    add(d, "Overall", {n: s["domain"][d] for n, s in summaries.items() if d in s["domain"]})
    subs = sorted({sd for s in summaries.values() for sd, v in s["subdomain"].items()
                   if v["domain"] == d})
    for sd in subs:
      add(d, sd, {n: {k: v for k, v in s["subdomain"][sd].items() if k != "domain"}
                  for n, s in summaries.items() if sd in s["subdomain"]})
  add("Average", "All Data", {n: s["average"] for n, s in summaries.items()})
  rej_rows = [[n, s["rejection_score"], s["rejection_total"]] for n, s in summaries.items()]

  bheaders = ["Box Count", "Model", *head_metrics, "Samples"]
  brows, bjson = [], []
  for b in BUCKET_ORDER:
    per = {n: s["box_count"][b] for n, s in summaries.items() if b in s["box_count"]}
    for name, m in sorted(per.items(), key=lambda kv: -_sort_key(kv[1])):
      brows.append([b, name, *_cells(m, with_point, with_box), m["count"]])
      bjson.append({"box_count": b, "model": name, **m})

  md = ("# Evaluation Results\n\n## Domain and Subdomain Metrics\n\n" + _md_table(headers, rows)
        + "\n\n## Rejection\n\nRejection Score = number of rejection-domain samples answered "
        "with an empty prediction (absolute count).\n\n"
        + _md_table(["Model", "Rejection Score", "Rejection Samples"], rej_rows)
        + "\n\n## Box Count Metrics\n\n" + _md_table(bheaders, brows) + "\n")
  js = {"domain_subdomain_metrics": jrows, "box_count_metrics": bjson,
        "rejection": {n: {"rejection_score": s["rejection_score"],
                          "rejection_total": s["rejection_total"]} for n, s in summaries.items()},
        "summary": summaries}
  return md, js


def read_jsonl(path) -> list[dict]:
  """JSON lines -> list of dicts (blank lines skipped; errors name the line)."""
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: invalid JSON ({e})") from None
  return out
