"""The demo's held-out protocol: UPN proposal recall and ChatRex referring accuracy, each next to
a trivial baseline.

UPN: class-agnostic recall at IoU 0.5 (the paper's proposal recall) of every ground-truth region
(objects and their parts) by the union of both prompts' filtered proposals, plus each prompt on
its own granularity and on the other one (the prompts must learn different granularities).
Baseline: as many uniformly random boxes per image as the UPN proposed.

ChatRex referring: for every object of a held-out scene, the official detection prompt with the
scene's unique referring expression ("Please detect the red circle in this image. ..."), the UPN
candidates as the object tokens (no ground-truth box is given), greedy decoding; a hit is a top-1
box with IoU >= 0.5 (RefCOCO protocol). Baseline: one candidate drawn uniformly at random (its
exact expected accuracy); the ceiling is the fraction of samples with any candidate hitting.

ChatRex region understanding: for every ground-truth region (objects and their dots) that a UPN
candidate covers (IoU >= 0.5, the best one), the official category-name prompt about that
candidate's `<objK>` ("What is the category name of <obj3>? ..."); a hit is an answer whose
first grounded phrase is the region's category. Baseline: always answering the most frequent
category of the evaluated regions.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from chatrex_jax.data import records as records_lib
from chatrex_jax.eval.recall import iou_matrix, proposal_recall
from chatrex_jax.eval.referring import referring_accuracy
from chatrex_jax.ops import boxes as box_ops
from chatrex_jax.protocol import prompts

PROMPTS = ("coarse", "fine")


@dataclasses.dataclass
class Scene:
  """One held-out record: the image and its ground truth (xyxy pixels)."""
  key: str
  image: Image.Image
  coarse: np.ndarray          # [G, 4] whole objects
  fine: np.ndarray            # [F, 4] parts
  referring: list[str]        # unique referring expression of each coarse region
  phrases: list[str]          # short phrase of each coarse region ("large red circle")
  categories: list[str]       # category of each coarse region, then of each fine one


def load_scenes(records_dir: str, limit: int | None = None) -> list[Scene]:
  scenes = []
  for r in records_lib.iter_records(records_dir):
    with Image.open(io.BytesIO(r["image"])) as f:
      image = f.convert("RGB")
    coarse = [g for g in r["regions"] if g["granularity"] == "coarse"]
    fine = [g for g in r["regions"] if g["granularity"] == "fine"]
    scenes.append(Scene(
        key=r["key"], image=image,
        coarse=np.asarray([g["box"] for g in coarse], np.float64).reshape(-1, 4),
        fine=np.asarray([g["box"] for g in fine], np.float64).reshape(-1, 4),
        referring=[g["referring"] for g in coarse], phrases=[g["phrase"] for g in coarse],
        categories=[g["category"] for g in coarse + fine]))
    if limit is not None and len(scenes) == limit:
      break
  return scenes


@dataclasses.dataclass
class SceneProposals:
  """Filtered proposals of one image per prompt (sorted by score) and their union."""
  boxes: dict[str, np.ndarray]     # prompt -> [K, 4]
  scores: dict[str, np.ndarray]    # prompt -> [K]
  candidates: np.ndarray           # [C, 4] union of the prompts by score, at most max_candidates
  candidate_prompts: list[str]     # which prompt proposed each candidate


def propose(scenes: Sequence[Scene], predict: Callable, *, max_candidates: int,
            batch_size: int = 16, progress: bool = True) -> list[SceneProposals]:
  """predict(images, prompt) -> [inference.upn.Proposals], as `upn_export.predictor_fn`."""
  from tqdm import tqdm
  per_prompt: dict[str, list] = {p: [] for p in PROMPTS}
  bar = tqdm(total=len(scenes) * len(PROMPTS), desc="UPN held-out", disable=not progress,
             dynamic_ncols=True)
  for start in range(0, len(scenes), batch_size):
    images = [s.image for s in scenes[start:start + batch_size]]
    for p in PROMPTS:
      per_prompt[p].extend(predict(images, p))
      bar.update(len(images))
  bar.close()
  out = []
  for i in range(len(scenes)):
    boxes = {p: np.asarray(per_prompt[p][i].boxes, np.float64).reshape(-1, 4) for p in PROMPTS}
    scores = {p: np.asarray(per_prompt[p][i].scores, np.float64).reshape(-1) for p in PROMPTS}
    all_boxes = np.concatenate([boxes[p] for p in PROMPTS])
    all_scores = np.concatenate([scores[p] for p in PROMPTS])
    origin = [p for p in PROMPTS for _ in range(len(boxes[p]))]
    order = np.argsort(-all_scores, kind="stable")[:max_candidates]
    out.append(SceneProposals(boxes, scores, all_boxes[order], [origin[j] for j in order]))
  return out


def random_boxes(rng: np.random.Generator, n: int, width: int, height: int,
                 min_frac: float = 0.05, max_frac: float = 0.5) -> np.ndarray:
  """n uniformly placed boxes with sides uniform in [min_frac, max_frac] of the image side."""
  w = rng.uniform(min_frac, max_frac, n) * width
  h = rng.uniform(min_frac, max_frac, n) * height
  x = rng.uniform(0, 1, n) * (width - w)
  y = rng.uniform(0, 1, n) * (height - h)
  return box_ops.xywh_to_xyxy(np.stack([x, y, w, h], axis=1).reshape(-1, 4))


def upn_metrics(scenes: Sequence[Scene], props: Sequence[SceneProposals], iou: float = 0.5,
                seed: int = 0) -> dict:
  gts_all = [np.concatenate([s.coarse, s.fine]) for s in scenes]
  union = [np.concatenate([p.boxes[q] for q in PROMPTS]) for p in props]
  rng = np.random.default_rng(seed)
  rand = [random_boxes(rng, len(u), *s.image.size) for s, u in zip(scenes, union)]
  coarse_gt, fine_gt = [s.coarse for s in scenes], [s.fine for s in scenes]
  by = lambda prompt: [p.boxes[prompt] for p in props]

  def rec(gts, boxes):
    return proposal_recall(gts, boxes, iou).pooled
  return {
      "recall@0.5": rec(gts_all, union),
      "recall@0.5_random_boxes": rec(gts_all, rand),
      "objects_by_coarse_prompt": rec(coarse_gt, by("coarse")),
      "parts_by_fine_prompt": rec(fine_gt, by("fine")),
      "objects_by_fine_prompt": rec(coarse_gt, by("fine")),
      "parts_by_coarse_prompt": rec(fine_gt, by("coarse")),
      "candidates_recall@0.5": rec(gts_all, [p.candidates for p in props]),
      "proposals_per_image": {q: float(np.mean([len(p.boxes[q]) for p in props])) for q in PROMPTS},
      "gt_regions": int(sum(len(g) for g in gts_all)),
      "images": len(scenes),
  }


@dataclasses.dataclass
class ReferringSample:
  scene: int
  region: int
  expression: str
  gt_box: np.ndarray


def referring_samples(scenes: Sequence[Scene]) -> list[ReferringSample]:
  return [ReferringSample(i, j, expr, s.coarse[j]) for i, s in enumerate(scenes)
          for j, expr in enumerate(s.referring)]


def referring_eval(pipe, scenes: Sequence[Scene], props: Sequence[SceneProposals], *,
                   iou: float = 0.5, batch_size: int = 16, max_new_tokens: int = 24,
                   progress: bool = True) -> tuple[dict, list[dict]]:
  """Runs the ChatRex pipeline on every referring sample; returns (metrics, prediction rows)."""
  from tqdm import tqdm
  samples = referring_samples(scenes)
  rows, top1 = [], []
  bar = tqdm(total=len(samples), desc="ChatRex held-out", disable=not progress, dynamic_ncols=True)
  for start in range(0, len(samples), batch_size):
    chunk = samples[start:start + batch_size]
    questions = [prompts.question("detect", s.expression) for s in chunk]
    preds = pipe.run_batch([scenes[s.scene].image for s in chunk], questions,
                           [props[s.scene].candidates for s in chunk], max_new_tokens=max_new_tokens)
    for s, q, p in zip(chunk, questions, preds):
      boxes = p.parsed.phrases[0].boxes if p.parsed.phrases else np.zeros((0, 4))
      box = np.asarray(boxes, np.float64).reshape(-1, 4)
      top1.append(box[0].tolist() if len(box) else None)
      phrase = p.parsed.phrases[0].phrase if p.parsed.phrases else None
      rows.append({"scene": scenes[s.scene].key, "region": s.region, "question": q,
                   "answer": p.answer, "phrase": phrase, "pred_box": top1[-1],
                   "gt_box": s.gt_box.tolist(), "num_candidates": int(len(props[s.scene].candidates))})
    bar.update(len(chunk))
  bar.close()
  result = referring_accuracy(top1, [s.gt_box for s in samples], iou)
  for row, hit, v in zip(rows, result.hits, result.ious):
    row.update(hit=bool(hit), iou=float(v))
  # Random choice among the candidates: expected accuracy = share of candidates that hit.
  chance, ceiling = [], []
  for s in samples:
    cand = props[s.scene].candidates
    hits = iou_matrix(s.gt_box[None], cand)[0] >= iou if len(cand) else np.zeros((0,), bool)
    chance.append(float(hits.mean()) if len(cand) else 0.0)
    ceiling.append(bool(hits.any()))
  # What the language side learned, apart from choosing the object: answers in the grounding
  # grammar with at least one valid object index, and the expression repeated exactly.
  metrics = {"accuracy": result.accuracy, "random_candidate_accuracy": float(np.mean(chance)),
             "candidate_ceiling": float(np.mean(ceiling)), "samples": len(samples),
             "answered_with_an_object": float(np.mean([t is not None for t in top1])),
             "expression_repeated": float(np.mean([r["phrase"] == s.expression
                                                   for r, s in zip(rows, samples)])),
             "mean_candidates": float(np.mean([len(props[s.scene].candidates) for s in samples]))}
  return metrics, rows


@dataclasses.dataclass
class RegionSample:
  scene: int
  region: int          # index into Scene.categories (coarse regions first)
  candidate: int       # the UPN candidate asked about (best IoU with the region)
  category: str


def region_samples(scenes: Sequence[Scene], props: Sequence[SceneProposals],
                   iou: float = 0.5) -> tuple[list[RegionSample], int]:
  """The regions a candidate covers, and how many regions no candidate covers."""
  samples, uncovered = [], 0
  for i, (s, p) in enumerate(zip(scenes, props)):
    gts = np.concatenate([s.coarse, s.fine])
    overlaps = iou_matrix(gts, p.candidates) if len(p.candidates) else np.zeros((len(gts), 0))
    for j, category in enumerate(s.categories):
      if overlaps.shape[1] and overlaps[j].max() >= iou:
        samples.append(RegionSample(i, j, int(np.argmax(overlaps[j])), category))
      else:
        uncovered += 1
  return samples, uncovered


def region_eval(pipe, scenes: Sequence[Scene], props: Sequence[SceneProposals], *,
                iou: float = 0.5, batch_size: int = 16, max_new_tokens: int = 24,
                progress: bool = True) -> tuple[dict, list[dict]]:
  """Category name of a given `<objK>`; returns (metrics, prediction rows)."""
  from collections import Counter

  from tqdm import tqdm
  samples, uncovered = region_samples(scenes, props, iou)
  rows = []
  bar = tqdm(total=len(samples), desc="ChatRex regions", disable=not progress, dynamic_ncols=True)
  for start in range(0, len(samples), batch_size):
    chunk = samples[start:start + batch_size]
    questions = [prompts.question("region_caption", s.candidate, granularity="category") for s in chunk]
    preds = pipe.run_batch([scenes[s.scene].image for s in chunk], questions,
                           [props[s.scene].candidates for s in chunk], max_new_tokens=max_new_tokens)
    for s, q, p in zip(chunk, questions, preds):
      phrase = p.parsed.phrases[0].phrase if p.parsed.phrases else None
      rows.append({"scene": scenes[s.scene].key, "region": s.region, "candidate": s.candidate,
                   "question": q, "answer": p.answer, "phrase": phrase, "category": s.category,
                   "hit": phrase is not None and phrase.strip().lower() == s.category})
    bar.update(len(chunk))
  bar.close()
  counts = Counter(s.category for s in samples)
  majority, majority_n = counts.most_common(1)[0] if counts else ("", 0)
  metrics = {"accuracy": float(np.mean([r["hit"] for r in rows])) if rows else 0.0,
             "majority_category_accuracy": majority_n / max(len(samples), 1),
             "majority_category": majority, "samples": len(samples),
             "regions_without_candidate": uncovered,
             "per_category": {c: float(np.mean([r["hit"] for r in rows if r["category"] == c]))
                              for c in sorted(counts)}}
  return metrics, rows
