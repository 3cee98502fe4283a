"""The engine's stages as plain functions over batches of work items (no Beam here).

A work item is a dict that flows through every stage:

    key, source, item_id, shard, meta          from the source reference
    status        "ok" | "dropped" | "error"
    stage, reason, detail                      where/why it left (if not ok)
    passed        names of the stages it went through
    image, image_format, width, height, rgb    after `load` (rgb is transient, never shuffled)
    caption, caption_provenance, conversations, phrases, regions
    region_drops  {reason: count} of regions removed along the way

Each `stage_*` function mutates the `ok` items of a batch. Backend calls are guarded by
`_apply`: a failing batch is retried item by item, so one bad item (corrupt image, backend
exception, timeout) becomes an `error` item with a reason and never stops the run.

Stage order: load -> caption -> converse (optional) -> phrases -> ground -> describe ->
verify -> finalize.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from chatrex_jax.data import schema
from chatrex_jax.ops import boxes as box_ops
from data_engine import filters as filters_lib
from data_engine import sources

STAGES = ("load", "filter", "caption", "converse", "phrases", "ground", "describe", "verify",
          "finalize")


# --------------------------------------------------------------------------- helpers
def new_item(ref: dict[str, Any], shard: int) -> dict[str, Any]:
  return {"key": ref["key"], "source": ref["source"], "item_id": ref["item_id"], "shard": shard,
          "meta": dict(ref.get("meta", {})), "load": ref["load"], "status": "ok", "stage": "",
          "reason": "", "detail": "", "passed": [], "region_drops": {}}


def _leave(item: dict, status: str, stage: str, reason: str, detail: str = "") -> None:
  item.update(status=status, stage=stage, reason=reason, detail=detail[:500])
  item.pop("rgb", None)


def _drop_region(item: dict, reason: str, n: int = 1) -> None:
  if n:
    item["region_drops"][reason] = item["region_drops"].get(reason, 0) + n


def _call(fn: Callable, args: tuple, timeout_s: float | None):
  if not timeout_s:
    return fn(*args)
  box: dict[str, Any] = {}

  def run():
    try:
      box["out"] = fn(*args)
    except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
      box["err"] = e
  t = threading.Thread(target=run, daemon=True)
  t.start()
  t.join(timeout_s)
  if t.is_alive():
    raise TimeoutError(f"backend call exceeded timeout_s={timeout_s}")
  if "err" in box:
    raise box["err"]
  return box["out"]


def _apply(stage: str, items: Sequence[dict], compute: Callable[[list[dict]], list],
           assign: Callable[[dict, Any], None], timeout_s: float | None = None) -> None:
  """Run `compute` on the ok items (batched), then `assign` each result.

  A batch failure is retried item by item; a timeout marks the batch's items as errors.
  """
  active = [it for it in items if it["status"] == "ok"]
  if not active:
    return
  try:
    results = _call(compute, (active,), timeout_s)
    if len(results) != len(active):
      raise RuntimeError(f"{stage}: backend returned {len(results)} results for {len(active)}")
    pairs = list(zip(active, results))
  except TimeoutError as e:
    for it in active:
      _leave(it, "error", stage, "timeout", str(e))
    return
  except Exception:  # noqa: BLE001 - isolate the failing item(s)
    pairs = []
    for it in active:
      try:
        pairs.append((it, _call(compute, ([it],), timeout_s)[0]))
      except TimeoutError as e:
        _leave(it, "error", stage, "timeout", str(e))
      except Exception as e:  # noqa: BLE001
        _leave(it, "error", stage, "backend_error", f"{type(e).__name__}: {e}")
  for it, res in pairs:
    try:
      assign(it, res)
    except Exception as e:  # noqa: BLE001
      _leave(it, "error", stage, "bad_output", f"{type(e).__name__}: {e}")
    if it["status"] == "ok":
      it["passed"].append(stage)


# ------------------------------------------------------------------------------ load
def stage_load(items: Sequence[dict], image_filter: filters_lib.ImageFilter) -> None:
  """Read the bytes, apply the metadata filters, decode safely, apply the image filters."""
  for it in items:
    if it["status"] != "ok":
      continue
    reason = image_filter.check_meta(it["meta"])
    if reason:
      _leave(it, "dropped", "filter", reason)
      continue
    try:
      data, extra = sources.load_bytes({"load": it.pop("load")})
    except Exception as e:  # noqa: BLE001
      _leave(it, "error", "load", "unreadable", f"{type(e).__name__}: {e}")
      continue
    it["meta"].update(extra)
    try:
      img = filters_lib.decode_image(data, image_filter.cfg.max_pixels)
    except filters_lib.ImageError as e:
      _leave(it, "error", "load", e.reason, e.detail)
      continue
    it.update(image=data, image_format=img.format, width=img.width, height=img.height,
              rgb=img.rgb)
    it["passed"].append("load")
    reason = image_filter.check_image(img)
    if reason:
      _leave(it, "dropped", "filter", reason, f"{img.width}x{img.height} {img.mode}")
      continue
    it["passed"].append("filter")


# --------------------------------------------------------------------------- caption
def stage_caption(items: Sequence[dict], vlm, cfg: dict, timeout_s=None) -> None:
  field = cfg.get("field", "caption")
  use_provided = cfg.get("use_provided", True)
  todo = []
  for it in items:
    if it["status"] != "ok":
      continue
    given = it["meta"].get(field) if use_provided else None
    if isinstance(given, str) and given.strip():
      it["caption"] = given.strip()
      it["caption_provenance"] = {"backend": f"manifest:{it['source']}", "version": field}
      it["passed"].append("caption")
    else:
      todo.append(it)

  def assign(it, text):
    text = " ".join(str(text).split())
    if not text:
      _leave(it, "dropped", "caption", "empty_caption")
      return
    it["caption"] = text
    it["caption_provenance"] = {"backend": vlm.name, "version": vlm.version}

  _apply("caption", todo, lambda b: vlm.caption([i["rgb"] for i in b], [i["meta"] for i in b]),
         assign, timeout_s)


# -------------------------------------------------------------------------- converse
def _given_turns(raw) -> list[dict]:
  turns = []
  for t in raw or []:
    role = t.get("role") or {"human": "user", "gpt": "assistant"}.get(t.get("from"), t.get("from"))
    text = t.get("text", t.get("value", t.get("content", "")))
    if role in schema.ROLES and isinstance(text, str) and text.strip():
      turns.append({"role": role, "text": text.replace("<image>", "").strip()})
  return turns


def stage_converse(items: Sequence[dict], vlm, cfg: dict, timeout_s=None) -> None:
  """Grounded-conversation variant: take the manifest's turns or ask the VLM the configured
  questions; the assistant turns are later treated as captions (phrases + grounding)."""
  if not cfg.get("enabled", False):
    for it in items:
      if it["status"] == "ok":
        it["conversations"] = []
    return
  field, questions = cfg.get("field", "conversations"), list(cfg.get("questions", []))
  todo = []
  for it in items:
    if it["status"] != "ok":
      continue
    turns = _given_turns(it["meta"].get(field))
    if turns:
      it["conversations"] = turns
      it["passed"].append("converse")
    else:
      todo.append(it)
  if not questions:
    for it in todo:
      it["conversations"] = []
    return

  def compute(batch):
    ims = [i["rgb"] for i in batch for _ in questions]
    metas = [i["meta"] for i in batch for _ in questions]
    answers = vlm.answer(ims, questions * len(batch), metas)
    return [answers[k * len(questions):(k + 1) * len(questions)] for k in range(len(batch))]

  def assign(it, answers):
    turns = []
    for q, a in zip(questions, answers):
      a = " ".join(str(a).split())
      if a:
        turns += [{"role": "user", "text": q}, {"role": "assistant", "text": a}]
    it["conversations"] = turns

  _apply("converse", todo, compute, assign, timeout_s)


# --------------------------------------------------------------------------- phrases
def stage_phrases(items: Sequence[dict], extractor) -> None:
  """spaCy phrases of the caption and of every assistant turn, with their spans."""
  active = [it for it in items if it["status"] == "ok"]
  texts, where = [], []
  for k, it in enumerate(active):
    texts.append(it["caption"])
    where.append((k, -1))
    for t, turn in enumerate(it.get("conversations", [])):
      if turn["role"] == "assistant":
        texts.append(turn["text"])
        where.append((k, t))
  try:
    extracted = extractor.extract(texts)
  except Exception as e:  # noqa: BLE001
    for it in active:
      _leave(it, "error", "phrases", "spacy_error", f"{type(e).__name__}: {e}")
    return
  per_item: list[dict[str, dict]] = [{} for _ in active]
  for (k, t), plist in zip(where, extracted):
    for p in plist:
      entry = per_item[k].setdefault(p.text.lower(), {"text": p.text, "category": p.category,
                                                      "occ": []})
      entry["occ"] += [[t, s, e] for s, e in p.spans]
  for it, found in zip(active, per_item):
    if not found:
      _leave(it, "dropped", "phrases", "no_phrases")
      continue
    it["phrases"] = list(found.values())
    it["phrases_provenance"] = extractor.version
    it["passed"].append("phrases")


# ---------------------------------------------------------------------------- ground
def stage_ground(items: Sequence[dict], grounder, cfg: dict, timeout_s=None) -> None:
  """Ground every phrase; de-duplicate boxes across phrases; mark parts as `fine`.

  Granularity rule: a region is `fine` when at least `part_containment` of its area lies
  inside another kept region that is at least 1/`part_max_area_ratio` times larger.
  """
  min_score = float(cfg.get("min_score", 0.0))
  dedupe_iou = float(cfg.get("dedupe_iou", 0.9))
  max_regions = int(cfg.get("max_regions", 50))
  contain = float(cfg.get("part_containment", 0.9))
  ratio = float(cfg.get("part_max_area_ratio", 0.5))

  def compute(batch):
    ims, phrases, metas, owner = [], [], [], []
    for k, it in enumerate(batch):
      for p in it["phrases"]:
        ims.append(it["rgb"])
        phrases.append(p["text"])
        metas.append(it["meta"])
        owner.append(k)
    hits = grounder.ground(ims, phrases, metas) if phrases else []
    out: list[list] = [[] for _ in batch]
    for k, h in zip(owner, hits):
      out[k].append(h)
    return out

  def assign(it, per_phrase):
    w, h = it["width"], it["height"]
    cands = []
    for p, hits in zip(it["phrases"], per_phrase):
      for box, score in hits:
        score = float(score)
        if not np.isfinite(score) or score < min_score:
          _drop_region(it, "low_score")
          continue
        x1, y1, x2, y2 = (round(float(min(max(v, 0.0), lim)), 2)
                          for v, lim in zip(box, (w, h, w, h)))
        if not (x2 > x1 and y2 > y1):
          _drop_region(it, "degenerate_box")
          continue
        cands.append({"box": [x1, y1, x2, y2], "score": min(1.0, max(0.0, score)),
                      "phrase": p["text"], "category": p["category"]})
    cands.sort(key=lambda r: (-r["score"], -len(r["phrase"]), r["phrase"], r["box"]))
    # float64 on the python-float boxes: the same numbers as scalar python arithmetic.
    boxes = np.asarray([c["box"] for c in cands], np.float64).reshape(-1, 4)
    iou = box_ops.pairwise_iou(boxes, boxes)
    kept_idx: list[int] = []
    for i in range(len(cands)):
      if (iou[i, kept_idx] >= dedupe_iou).any():
        _drop_region(it, "duplicate")
      elif len(kept_idx) >= max_regions:
        _drop_region(it, "over_limit")
      else:
        kept_idx.append(i)
    kept = [cands[i] for i in kept_idx]
    areas = box_ops.area(boxes[kept_idx])
    inter = box_ops.pairwise_intersection(boxes[kept_idx], boxes[kept_idx])
    for j, r in enumerate(kept):
      inside = (areas[j] <= ratio * areas) & (inter[j] >= contain * areas[j])
      inside[j] = False  # not a part of itself
      r["granularity"] = "fine" if inside.any() else "coarse"
      r["provenance"] = {"phrase": it["phrases_provenance"], "box": grounder.provenance}
    if not kept:
      _leave(it, "dropped", "ground", "no_regions")
      return
    it["regions"] = kept

  _apply("ground", items, compute, assign, timeout_s)


# -------------------------------------------------------------------------- describe
def stage_describe(items: Sequence[dict], vlm, timeout_s=None) -> None:
  """Phrase-conditioned detailed description of every region."""

  def compute(batch):
    ims, boxes, phrases, metas, owner = [], [], [], [], []
    for k, it in enumerate(batch):
      for r in it["regions"]:
        ims.append(it["rgb"])
        boxes.append(r["box"])
        phrases.append(r["phrase"])
        metas.append(it["meta"])
        owner.append(k)
    texts = vlm.describe_regions(ims, boxes, phrases, metas)
    out: list[list] = [[] for _ in batch]
    for k, t in zip(owner, texts):
      out[k].append(t)
    return out

  def assign(it, texts):
    kept = []
    for r, t in zip(it["regions"], texts):
      t = " ".join(str(t).split())
      if not t:
        _drop_region(it, "empty_description")
        continue
      r["description"] = t
      r["provenance"]["description"] = vlm.provenance
      kept.append(r)
    if not kept:
      _leave(it, "dropped", "describe", "no_descriptions")
      return
    it["regions"] = kept

  _apply("describe", items, compute, assign, timeout_s)


# ---------------------------------------------------------------------------- verify
def stage_verify(items: Sequence[dict], verifier, cfg: dict, timeout_s=None) -> None:
  """Drop regions whose description does not match the phrase; rewrite the rest."""
  threshold = float(cfg.get("threshold", 0.5))

  def compute(batch):
    flat = [(k, r) for k, it in enumerate(batch) for r in it["regions"]]
    metas = [batch[k]["meta"] for k, _ in flat]
    phrases = [r["phrase"] for _, r in flat]
    descs = [r["description"] for _, r in flat]
    scores = verifier.verify(phrases, descs, metas)
    keep = [i for i, s in enumerate(scores) if float(s) >= threshold]
    rewrites = verifier.rewrite([phrases[i] for i in keep], [descs[i] for i in keep],
                                [flat[i][1]["box"] for i in keep], [metas[i] for i in keep])
    rw = dict(zip(keep, rewrites))
    out: list[list] = [[] for _ in batch]
    for i, (k, _) in enumerate(flat):
      out[k].append((float(scores[i]), rw.get(i)))
    return out

  def assign(it, results):
    kept = []
    for r, (score, text) in zip(it["regions"], results):
      if not np.isfinite(score) or score < threshold:
        _drop_region(it, "verify_mismatch")
        continue
      r["verify_score"] = min(1.0, max(0.0, score))
      r["provenance"]["verify"] = verifier.provenance
      text = " ".join(str(text or "").split())
      if text:
        r["referring"] = text
        r["provenance"]["referring"] = verifier.provenance
      else:  # the rewriter gave nothing usable: fall back to the phrase itself
        r["referring"] = f"the {r['phrase']}"
        r["provenance"]["referring"] = "rule:fallback-the-phrase"
      kept.append(r)
    if not kept:
      _leave(it, "dropped", "verify", "no_verified_regions")
      return
    it["regions"] = kept

  _apply("verify", items, compute, assign, timeout_s)


# -------------------------------------------------------------------------- finalize
_META_SKIP = ("caption", "conversations", "scene", "synthetic")


def to_record(it: dict[str, Any]) -> dict[str, Any]:
  """A finished work item -> schema record (validated)."""
  regions = []
  for i, r in enumerate(it["regions"]):
    regions.append({"id": i, "box": r["box"], "category": r["category"], "phrase": r["phrase"],
                    "description": r["description"], "referring": r["referring"],
                    "score": round(r["score"], 6), "verify_score": round(r["verify_score"], 6),
                    "granularity": r["granularity"], "provenance": r["provenance"]})
  by_phrase: dict[str, list[int]] = {}
  for r in regions:
    by_phrase.setdefault(r["phrase"].lower(), []).append(r["id"])
  turns = [{"role": t["role"], "text": t["text"], "groundings": []}
           for t in it.get("conversations", [])]
  for p in it["phrases"]:
    ids = by_phrase.get(p["text"].lower())
    if not ids:
      continue
    for t, s, e in p["occ"]:
      if t >= 0:
        turns[t]["groundings"].append({"start": s, "end": e, "region_ids": ids})
  for t in turns:
    t["groundings"].sort(key=lambda g: (g["start"], g["end"]))
  extra = {k: v for k, v in it["meta"].items() if k not in _META_SKIP}
  if "scene" in it["meta"]:
    extra["synthetic_scene"] = it["meta"]["scene"]
  record = {
      "schema_version": schema.SCHEMA_VERSION, "key": it["key"], "source": it["source"],
      "item_id": it["item_id"], "image": it["image"], "image_format": it["image_format"],
      "width": it["width"], "height": it["height"], "caption": it["caption"],
      "caption_provenance": it["caption_provenance"], "regions": regions, "proposals": None,
      "conversations": turns, "extra": extra,
  }
  schema.validate(record)
  return record


def stage_finalize(items: Sequence[dict]) -> None:
  for it in items:
    if it["status"] != "ok":
      continue
    try:
      it["record"] = schema.encode(to_record(it))
      it["num_regions"] = len(it["regions"])
      it["passed"].append("finalize")
    except Exception as e:  # noqa: BLE001
      _leave(it, "error", "finalize", "schema", f"{type(e).__name__}: {e}")


def slim(it: dict[str, Any]) -> dict[str, Any]:
  """What the writer needs (keeps the shuffle small): the encoded record or the reason."""
  keep = ("key", "source", "item_id", "shard", "status", "stage", "reason", "detail", "passed",
          "region_drops", "record", "num_regions")
  return {k: it[k] for k in keep if k in it}


@contextlib.contextmanager
def timed(totals: dict[str, list], stage: str, n: int):
  """Accumulate [seconds, items] of a stage into `totals` (benchmarks)."""
  start = time.perf_counter()
  yield
  t = totals.setdefault(stage, [0.0, 0])
  t[0] += time.perf_counter() - start
  t[1] += n
