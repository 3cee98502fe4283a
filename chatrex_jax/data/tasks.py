"""Training-task sampling for one engine record (issue 8; docs/architecture.md B.7, B.10, C).

`sample_task(record, rng, config)` turns one engine record (`chatrex_jax/data/schema.py`) into a
`TaskSample`: the chat turns (user question with the official prompt paraphrase, assistant answer in
the ChatRex output grammar) and the input boxes the answer's `<objK>` tags refer to.

Tasks (names are the keys of `config.tasks.weights`):

* ``grounding``: [OBJ] = one or more categories ("circle; square"), one short phrase or one
  referring expression -> every region with that name. Answer, one line per query:
  ``<ground>circle</ground><objects><obj2><obj5></objects>`` (indices ascending, lines joined by
  "\\n", docs/architecture.md B.10 "Detection"). Prompt: `prompts.GROUNDING` (21 variants).
* ``region``: [OBJ] = ``<objK>`` of one (or a few) regions -> the region's category / short
  phrase / brief (referring expression) / one-sentence (detailed description) text. Answer
  ``<ground>{text}</ground><objects><objK></objects>`` (docs/architecture.md B.10 "Region caption"), one line per
  region. Prompts: the four `prompts.REGION_CAPTION_*` lists.
* ``grounded_caption``: the image caption with every region phrase found in it tagged inline:
  ``A <ground>large red circle</ground><objects><obj3></objects> and ...`` (docs/architecture.md B.10 "Grounded
  caption"). Prompt: brief (one sentence) or detailed `prompts.GROUNDED_CAPTION_*` by caption length.
* ``conversation``: the record's grounded conversation; each grounded span of an assistant turn
  becomes ``<ground>span</ground><objects>...</objects>``; every user turn is prefixed with
  `prompts.GROUNDED_CONVERSATION_PREFIX` (docs/architecture.md C).

Follow-up turns (`config.turns` > 1): the conversation goes on with more grounding / region
questions about the same input boxes, drawn like the first (same weights and kinds, over the regions
among the boxes; each drawn independently of the earlier ones), each a user turn without the image
and object prefix, as a multi-turn chat continues. One image and object list then supervises several
answers; the pipeline drops the follow-ups that do not fit `seq_len` whole (`fit_turns`).

Input boxes (`build_input_boxes`): every ground-truth region box (capped so at most `max_objects`
boxes are given; regions the answer needs are always kept) mixed with extra negatives: the record's
stored UPN proposals when present (those overlapping a ground-truth box by IoU >= `dedup_iou` are
dropped, so no unlabelled near-duplicate of an answer box exists), otherwise jittered copies of
ground-truth boxes and random boxes (same IoU rule). The list is shuffled with the sample's rng;
the answer tags use the shuffled indices. All randomness comes from the `np.random.Generator`
passed in, so a sample is a pure function of (record, rng state, config).

Bad records raise `FieldError(field, message)`; the pipeline adds the record key and source.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np

from chatrex_jax.errors import UserError
from chatrex_jax.ops import boxes as box_ops
from chatrex_jax.protocol import prompts
from chatrex_jax.protocol import tokens as C
from chatrex_jax.protocol.grammar import grounded

TASK_NAMES = tuple(prompts.TRAINING_TASKS)
TASK_IDS = {name: i for i, name in enumerate(TASK_NAMES)}
GROUNDING_KINDS = ("category", "phrase", "referring")
# region-caption granularity -> (prompt granularity, record region field)
REGION_GRANULARITIES = {
    "category": ("category", "category"),
    "short_phrase": ("short_phrase", "phrase"),
    "brief": ("brief", "referring"),
    "one_sentence": ("one_sentence", "description"),
}


class FieldError(UserError, ValueError):
  """A record field that cannot be used; `field` is the schema path (e.g. "regions[3].box")."""

  def __init__(self, field: str, message: str):
    super().__init__(f"field {field}: {message}")
    self.field = field


@dataclasses.dataclass
class TaskSample:
  """One training conversation built from a record.

  task: one of TASK_NAMES; kind: the sub-kind (grounding: category/phrase/referring; region:
    a granularity; grounded_caption: brief/detailed/plain; conversation: "conversation").
  turns: [(user, assistant)]; the first user text starts with `<image>\\n<obj0><objfeat>...\\n`.
  boxes: float64 [N, 4] input boxes, xyxy pixels of the original image, in prompt order
    (`<objK>` = boxes[K]); N <= max_objects.
  box_region: int64 [N] the record region id of each input box, -1 for proposals / negatives.
  answer_regions: for each `<ground>` group of the answers, in order, the region ids it names.
  """
  task: str
  kind: str
  turns: list[tuple[str, str]]
  boxes: np.ndarray
  box_region: np.ndarray
  answer_regions: list[list[int]]

  @property
  def task_id(self) -> int:
    return TASK_IDS[self.task]


# ------------------------------------------------------------------------------------------
# Helpers


def _cfg(config: Any, key: str, default=None):
  if config is None:
    return default
  if isinstance(config, Mapping):
    return config.get(key, default)
  return getattr(config, key, default) if hasattr(config, key) else default


def _norm(text: str) -> str:
  return " ".join(text.lower().split())


def _check_text(text: Any, field: str) -> str:
  """A free-text field: a str without the `<image>` / `<objfeat>` placeholder literals (they
  would become image / object slots when tokenised)."""
  if not isinstance(text, str):
    raise FieldError(field, f"expected str, got {type(text).__name__}")
  for p in C.PLACEHOLDERS:
    if p in text:
      raise FieldError(field, f"contains the placeholder {p!r}, which would be tokenised as an "
                       "image/object slot")
  return text


def _weighted_choice(rng: np.random.Generator, weights: Mapping[str, float],
                     allowed: Sequence[str], what: str) -> str:
  names = [n for n in allowed if float(weights.get(n, 0.0)) > 0]
  if not names:
    raise ValueError(f"no {what} with positive weight among {list(allowed)} (weights {dict(weights)})")
  w = np.asarray([float(weights[n]) for n in names], np.float64)
  return names[int(rng.choice(len(names), p=w / w.sum()))]


def _variant(rng: np.random.Generator, n: int, config) -> int:
  """Prompt paraphrase index: uniform over all variants, or 0 with `prompt_variants="first"`."""
  mode = _cfg(config, "prompt_variants", "all")
  if mode == "first":
    return 0
  if mode != "all":
    raise ValueError(f"tasks.prompt_variants must be 'all' or 'first', got {mode!r}")
  return int(rng.integers(n))


# ------------------------------------------------------------------------------------------
# Input boxes


def _record_boxes(record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  regions = record.get("regions") or []
  boxes = np.zeros((len(regions), 4), np.float64)
  ids = np.zeros((len(regions),), np.int64)
  for i, r in enumerate(regions):
    box = r.get("box") if isinstance(r, Mapping) else None
    try:
      b = np.asarray(box, np.float64).reshape(4)
    except (TypeError, ValueError):
      raise FieldError(f"regions[{i}].box", f"expected 4 numbers, got {box!r}") from None
    if not (np.all(np.isfinite(b)) and b[0] < b[2] and b[1] < b[3]):
      raise FieldError(f"regions[{i}].box", f"{box!r} is not a finite xyxy box with x1<x2, y1<y2")
    boxes[i] = b
    ids[i] = int(r["id"])
  return boxes, ids


def _stored_proposals(record: Mapping[str, Any]) -> np.ndarray | None:
  props = record.get("proposals")
  if props is None:
    return None
  try:
    b = np.asarray(props["boxes"], np.float64).reshape(-1, 4)
  except (TypeError, ValueError, KeyError):
    raise FieldError("proposals.boxes", "expected [[x1, y1, x2, y2], ...]") from None
  ok = np.all(np.isfinite(b), -1) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
  return b[ok]


def _synthetic_negatives(rng: np.random.Generator, gt: np.ndarray, n: int, width: int,
                         height: int, config) -> np.ndarray:
  """Up to n negatives: jittered ground-truth boxes (prob `jitter_prob`) and random boxes."""
  if n <= 0:
    return np.zeros((0, 4), np.float64)
  k = 4 * n + 8  # candidates; those too close to a ground-truth box are rejected
  jitter_prob = float(_cfg(config, "jitter_prob", 0.5)) if len(gt) else 0.0
  scale = float(_cfg(config, "jitter_scale", 0.3))
  lo, hi = float(_cfg(config, "random_min_size", 0.05)), float(_cfg(config, "random_max_size", 0.5))
  # random boxes: side fractions in [lo, hi] of the image side, uniform position
  w = rng.uniform(lo, hi, k) * width
  h = rng.uniform(lo, hi, k) * height
  x1 = rng.uniform(0, 1, k) * np.maximum(width - w, 0)
  y1 = rng.uniform(0, 1, k) * np.maximum(height - h, 0)
  cand = np.stack([x1, y1, x1 + w, y1 + h], -1)
  if jitter_prob > 0:
    src = gt[rng.integers(len(gt), size=k)]
    cx, cy, bw, bh = box_ops.xyxy_to_cxcywh(src).T
    noise = rng.normal(0, scale, (k, 4))
    cx, cy = cx + noise[:, 0] * bw, cy + noise[:, 1] * bh
    bw, bh = bw * np.exp(noise[:, 2]), bh * np.exp(noise[:, 3])
    jit = box_ops.cxcywh_to_xyxy(np.stack([cx, cy, bw, bh], -1))
    use = rng.uniform(0, 1, k) < jitter_prob
    cand = np.where(use[:, None], jit, cand)
  cand[:, 0::2] = np.clip(cand[:, 0::2], 0, width)
  cand[:, 1::2] = np.clip(cand[:, 1::2], 0, height)
  return cand


def _keep_negatives(cand: np.ndarray, gt: np.ndarray, dedup_iou: float, n: int) -> np.ndarray:
  ok = np.all(box_ops.xyxy_to_xywh(cand)[:, 2:] >= 1, axis=-1)  # at least 1 px wide and high
  if len(gt):
    ok &= box_ops.pairwise_iou(cand, gt, dtype=np.float64).max(-1) < dedup_iou
  return cand[ok][:n]


def build_input_boxes(record: Mapping[str, Any], rng: np.random.Generator, required: Sequence[int],
                      max_objects: int, config=None) -> tuple[np.ndarray, np.ndarray]:
  """Shuffled input boxes: ground-truth regions + proposals / negatives.

  required: region ids that must be among the boxes (the answer names them).
  config: the `proposals` section (use_stored, synthesize, min_extra, max_extra, dedup_iou,
    jitter_prob, jitter_scale, random_min_size, random_max_size).
  Returns (boxes float64 [N, 4] xyxy original pixels, box_region int64 [N]: region id or -1),
  N <= max_objects.
  """
  gt, ids = _record_boxes(record)
  required = list(dict.fromkeys(int(r) for r in required))
  if len(required) > max_objects:
    raise FieldError("regions", f"the answer needs {len(required)} regions > max_objects={max_objects}")
  if len(gt) > max_objects:  # keep the required regions + a random subset of the others
    is_req = np.isin(ids, required)
    others = np.flatnonzero(~is_req)
    keep = np.concatenate([np.flatnonzero(is_req),
                           rng.permutation(others)[:max_objects - int(is_req.sum())]])
    keep.sort()
    gt, ids = gt[keep], ids[keep]
  budget = max_objects - len(gt)
  lo = int(_cfg(config, "min_extra", 0))
  hi = int(_cfg(config, "max_extra", 30))
  n_extra = min(budget, int(rng.integers(lo, max(lo, hi) + 1))) if budget > 0 else 0
  dedup = float(_cfg(config, "dedup_iou", 0.7))
  extra = np.zeros((0, 4), np.float64)
  stored = _stored_proposals(record) if _cfg(config, "use_stored", True) else None
  if n_extra > 0 and stored is not None and len(stored):
    cand = stored[rng.permutation(len(stored))]
    extra = _keep_negatives(cand, gt, dedup, n_extra)
  elif n_extra > 0 and stored is None and _cfg(config, "synthesize", True):
    width, height = int(record["width"]), int(record["height"])
    cand = _synthetic_negatives(rng, gt, n_extra, width, height, config)
    extra = _keep_negatives(cand, gt, dedup, n_extra)
  boxes = np.concatenate([gt, extra], 0)
  box_region = np.concatenate([ids, np.full((len(extra),), -1, np.int64)])
  perm = rng.permutation(len(boxes))
  return boxes[perm], box_region[perm]


# ------------------------------------------------------------------------------------------
# Task builders. Each returns (task, kind, questions/answers builder) given the region->index map.


def _regions(record) -> list[Mapping[str, Any]]:
  return list(record.get("regions") or [])


def _region_text(record, rid: int, field: str) -> str:
  for i, r in enumerate(_regions(record)):
    if int(r["id"]) == rid:
      text = r.get(field)
      if not isinstance(text, str) or not text.strip():
        raise FieldError(f"regions[{i}].{field}", f"expected a non-empty str, got {text!r}")
      return _check_text(text, f"regions[{i}].{field}").strip()
  raise FieldError("regions", f"no region with id {rid}")


def _group_by(record, field: str) -> dict[str, tuple[str, list[int]]]:
  """normalised text -> (display text of the first region, [region ids]) over all regions."""
  groups: dict[str, tuple[str, list[int]]] = {}
  for i, r in enumerate(_regions(record)):
    text = r.get(field)
    if not isinstance(text, str) or not text.strip():
      raise FieldError(f"regions[{i}].{field}", f"expected a non-empty str, got {text!r}")
    _check_text(text, f"regions[{i}].{field}")
    key = _norm(text)
    groups.setdefault(key, (text.strip(), []))[1].append(int(r["id"]))
  return groups


def _caption_spans(record) -> list[tuple[int, int, list[int]]]:
  """Non-overlapping (start, end, region ids) spans of region phrases in the caption; longer
  phrases first, first occurrence (case-insensitive, on word boundaries)."""
  caption = _check_text(record.get("caption") or "", "caption")
  groups = _group_by(record, "phrase")
  spans: list[tuple[int, int, list[int]]] = []
  taken = np.zeros(len(caption) + 1, bool)
  for key in sorted(groups, key=lambda k: (-len(k), k)):
    _, rids = groups[key]
    words = [re.escape(w) for w in key.split()]
    pattern = r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)"
    for m in re.finditer(pattern, caption, flags=re.IGNORECASE):
      if not taken[m.start():m.end()].any():
        taken[m.start():m.end()] = True
        spans.append((m.start(), m.end(), rids))
        break
  spans.sort()
  return spans


def _insert_tags(text: str, spans: Sequence[tuple[int, int, Sequence[int]]],
                 index_of: Mapping[int, int], field: str) -> str:
  out, pos = [], 0
  for s, e, rids in sorted(spans, key=lambda x: x[0]):
    if s < pos:
      raise FieldError(field, f"grounding spans overlap at [{s}, {e})")
    out.append(text[pos:s])
    out.append(grounded(text[s:e], [index_of[r] for r in rids]))
    pos = e
  out.append(text[pos:])
  return "".join(out)


def _conversation_pairs(record) -> list[tuple[dict, dict]]:
  turns = record.get("conversations") or []
  if len(turns) % 2:
    raise FieldError("conversations", f"{len(turns)} turns; expected (user, assistant) pairs")
  pairs = []
  for t in range(0, len(turns), 2):
    u, a = turns[t], turns[t + 1]
    if not (isinstance(u, Mapping) and isinstance(a, Mapping) and u.get("role") == "user"
            and a.get("role") == "assistant"):
      raise FieldError(f"conversations[{t}]", "turns must alternate user, assistant")
    for j, turn in ((t, u), (t + 1, a)):
      _check_text(turn.get("text"), f"conversations[{j}].text")
    pairs.append((u, a))
  return pairs


def applicable_tasks(record: Mapping[str, Any]) -> list[str]:
  """The tasks a record supports: grounding / region need regions, grounded_caption a region
  phrase found in the caption, conversation a non-empty `conversations`."""
  out = []
  if _regions(record):
    out += ["grounding", "region"]
    if _caption_spans(record):
      out.append("grounded_caption")
  if record.get("conversations"):
    out.append("conversation")
  return out


def sample_task(record: Mapping[str, Any], rng: np.random.Generator, config=None, *,
                max_objects: int = C.MAX_NUM_OBJECTS, proposals=None,
                task: str | None = None) -> TaskSample:
  """Draws one task (weights `config.weights`) for the record and builds its turns and boxes.

  config: the `tasks` section of the data config (weights, grounding_kinds, region_granularities,
    grounding_max_queries, region_max_regions (each drawn uniformly from 1, or from
    grounding_min_queries / region_min_regions where given, up to the maximum and what the
    record holds), grounding_repeat_queries (queries drawn with replacement, so a question
    may name a category twice and a multi-query answer cannot be completed by elimination: a
    pretraining drill; default False), prompt_variants, brief_caption_max_sentences,
    turns: 1 + the follow-up grounding / region turns about the same boxes; default 1).
  proposals: the `proposals` section (see `build_input_boxes`).
  task: force a task (tests); otherwise drawn among `applicable_tasks(record)`.
  A record with no applicable task but a caption gets a plain caption answer ("grounded_caption",
  kind "plain"); one without a caption raises FieldError.
  """
  if not 1 <= max_objects <= C.MAX_NUM_OBJECTS:
    raise ValueError(f"max_objects={max_objects} outside [1, {C.MAX_NUM_OBJECTS}] (<obj99> is the last tag)")
  weights = dict(_cfg(config, "weights", None) or {n: 1.0 for n in TASK_NAMES})
  unknown = set(weights) - set(TASK_NAMES)
  if unknown:
    raise ValueError(f"unknown task names in weights: {sorted(unknown)}; known {TASK_NAMES}")
  possible = applicable_tasks(record)
  if task is None:
    usable = [t for t in TASK_NAMES if t in possible and float(weights.get(t, 0)) > 0]
    if usable:
      task = _weighted_choice(rng, weights, usable, "task")
    else:
      task = "plain_caption"
  elif task not in possible:
    raise FieldError("regions" if task != "conversation" else "conversations",
                     f"task {task!r} is not applicable to this record (applicable: {possible})")
  build = {"grounding": _grounding, "region": _region, "grounded_caption": _grounded_caption,
           "conversation": _conversation}.get(task, _plain_caption)
  sample = build(record, rng, config, max_objects, proposals)
  follow_ups = int(_cfg(config, "turns", 1)) - 1
  if follow_ups < 0:
    raise ValueError(f"tasks.turns={follow_ups + 1}: a conversation needs at least 1 turn")
  return _add_follow_ups(sample, record, rng, config, max_objects, follow_ups) if follow_ups else sample


PERCEPTION_TASKS = ("grounding", "region")


def _add_follow_ups(sample: TaskSample, record, rng, config, max_objects: int,
                    count: int) -> TaskSample:
  """`sample` with `count` more grounding / region turns about its input boxes (the tasks of
  `config.weights` among PERCEPTION_TASKS; none when both weigh 0), each drawn independently
  of the earlier turns: steering follow-ups to regions not named yet lets a model answer by
  elimination (measured: the tiny LLM's `<objK>` accuracy 0.42 at the eighth turn, 0.08 on a
  first turn), which an independent draw offers only as a repeat of an earlier answer."""
  index_of = {rid: k for k, rid in enumerate(sample.box_region.tolist()) if rid >= 0}
  shown = dict(record, regions=[r for r in _regions(record) if int(r["id"]) in index_of])
  weights = dict(_cfg(config, "weights", None) or {n: 1.0 for n in TASK_NAMES})
  usable = [t for t in PERCEPTION_TASKS if float(weights.get(t, 0)) > 0]
  if not usable or not shown["regions"]:
    return sample
  prefix = prompts.build_user_text("", len(sample.boxes))
  turns, answer_regions = list(sample.turns), list(sample.answer_regions)
  for _ in range(count):
    task = _weighted_choice(rng, weights, usable, "task")
    build = _grounding if task == "grounding" else _region
    more = build(shown, rng, config, max_objects, None, boxes=(sample.boxes, sample.box_region))
    (question, answer), = more.turns
    assert question.startswith(prefix), "build_user_text changed its layout"
    turns.append((question[len(prefix):], answer))
    answer_regions += more.answer_regions
  return dataclasses.replace(sample, turns=turns, answer_regions=answer_regions)


def keep_turns(sample: TaskSample, count: int) -> TaskSample:
  """The sample's first `count` turns (and the answer groups they hold)."""
  if count >= len(sample.turns):
    return sample
  turns = sample.turns[:count]
  groups = sum(answer.count(C.GROUND_START) for _, answer in turns)
  return dataclasses.replace(sample, turns=turns, answer_regions=sample.answer_regions[:groups])


def _finish(task, kind, record, rng, required, max_objects, proposals, make_turns,
            boxes=None) -> TaskSample:
  """The sample on `boxes` ((boxes, box_region) of an earlier turn) or on new input boxes."""
  if boxes is None:
    boxes, box_region = build_input_boxes(record, rng, required, max_objects, proposals)
  else:
    boxes, box_region = boxes
  index_of: dict[int, int] = {}
  for k, rid in enumerate(box_region.tolist()):
    if rid >= 0:
      index_of[rid] = k
  turns, answer_regions = make_turns(index_of, len(boxes))
  return TaskSample(task=task, kind=kind, turns=turns, boxes=boxes, box_region=box_region,
                    answer_regions=answer_regions)


def _grounding(record, rng, config, max_objects, proposals, boxes=None) -> TaskSample:
  kinds = dict(_cfg(config, "grounding_kinds", None) or {k: 1.0 for k in GROUNDING_KINDS})
  kind = _weighted_choice(rng, kinds, GROUNDING_KINDS, "grounding kind")
  field = {"category": "category", "phrase": "phrase", "referring": "referring"}[kind]
  groups = _group_by(record, field)
  keys = sorted(groups)
  repeat = bool(_cfg(config, "grounding_repeat_queries", False))
  max_q = 1 if kind == "referring" else int(_cfg(config, "grounding_max_queries", 3))
  max_q = max_q if repeat else min(max_q, len(keys))
  n_q = int(rng.integers(min(int(_cfg(config, "grounding_min_queries", 1)), max_q), max_q + 1))
  chosen = [keys[i] for i in rng.choice(len(keys), size=n_q, replace=repeat)]
  # keep the chosen queries (their regions) within max_objects
  required: list[int] = []
  kept: list[tuple[str, list[int]]] = []  # (display name, region ids)
  for key in chosen:
    rids = groups[key][1]
    if len(set(required) | set(rids)) > max_objects:
      if kept:
        break  # later queries do not fit
      # a single name with more regions than boxes: give a random subset; the answer names
      # exactly the given boxes of that name, which is the correct answer for that input.
      rids = sorted(int(r) for r in rng.choice(rids, size=max_objects, replace=False))
    kept.append((groups[key][0], rids))
    required += rids
  variant = _variant(rng, len(prompts.GROUNDING), config)
  question = prompts.question("detect", [name for name, _ in kept], variant=variant)

  def make_turns(index_of, n):
    answer = "\n".join(grounded(name, [index_of[r] for r in rids]) for name, rids in kept)
    return ([(prompts.build_user_text(question, n), answer)],
            [sorted(rids, key=lambda r: index_of[r]) for _, rids in kept])
  return _finish("grounding", kind, record, rng, required, max_objects, proposals, make_turns,
                 boxes)


def _region(record, rng, config, max_objects, proposals, boxes=None) -> TaskSample:
  grans = dict(_cfg(config, "region_granularities", None) or {g: 1.0 for g in REGION_GRANULARITIES})
  gran = _weighted_choice(rng, grans, tuple(REGION_GRANULARITIES), "region granularity")
  prompt_gran, field = REGION_GRANULARITIES[gran]
  rids_all = [int(r["id"]) for r in _regions(record)]
  max_r = min(int(_cfg(config, "region_max_regions", 1)), len(rids_all), max_objects)
  n_r = int(rng.integers(min(int(_cfg(config, "region_min_regions", 1)), max_r), max_r + 1))
  rids = [rids_all[i] for i in rng.choice(len(rids_all), size=n_r, replace=False)]
  texts = [_region_text(record, r, field) for r in rids]
  variant = _variant(rng, len(prompts.templates("region_caption", prompt_gran)), config)

  def make_turns(index_of, n):
    question = prompts.question("region_caption", [index_of[r] for r in rids],
                                granularity=prompt_gran, variant=variant)
    answer = "\n".join(grounded(t, [index_of[r]]) for t, r in zip(texts, rids))
    return [(prompts.build_user_text(question, n), answer)], [[r] for r in rids]
  return _finish("region", gran, record, rng, rids, max_objects, proposals, make_turns, boxes)


def _sentences(text: str) -> int:
  return len([s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s])


def _grounded_caption(record, rng, config, max_objects, proposals) -> TaskSample:
  caption = record["caption"].strip()
  spans = _caption_spans(dict(record, caption=caption))
  brief = _sentences(caption) <= int(_cfg(config, "brief_caption_max_sentences", 1))
  kind = "brief" if brief else "detailed"
  # drop trailing spans whose regions no longer fit
  required: list[int] = []
  kept = []
  for s, e, rids in spans:
    if len(set(required) | set(rids)) > max_objects:
      break
    kept.append((s, e, rids))
    required = list(dict.fromkeys(required + list(rids)))
  variant = _variant(rng, len(prompts.templates("grounded_caption", kind)), config)
  question = prompts.question("grounded_caption", granularity=kind, variant=variant)

  def make_turns(index_of, n):
    answer = _insert_tags(caption, kept, index_of, "caption")
    return ([(prompts.build_user_text(question, n), answer)],
            [sorted(r, key=lambda x: index_of[x]) for _, _, r in kept])
  return _finish("grounded_caption", kind, record, rng, required, max_objects, proposals, make_turns)


def _plain_caption(record, rng, config, max_objects, proposals) -> TaskSample:
  caption = record.get("caption")
  if not isinstance(caption, str) or not caption.strip():
    raise FieldError("regions", "no task applicable (no regions, no conversations) and no caption")
  caption = _check_text(caption, "caption").strip()
  kind = "brief" if _sentences(caption) <= int(_cfg(config, "brief_caption_max_sentences", 1)) else "detailed"
  variant = _variant(rng, len(prompts.templates("grounded_caption", kind)), config)
  question = prompts.question("grounded_caption", granularity=kind, variant=variant)

  def make_turns(index_of, n):
    return [(prompts.build_user_text(question, n), caption)], []
  sample = _finish("grounded_caption", "plain", record, rng, [], max_objects, proposals, make_turns)
  return sample


def _conversation(record, rng, config, max_objects, proposals) -> TaskSample:
  pairs = _conversation_pairs(record)
  region_ids = {int(r["id"]) for r in _regions(record)}
  required: list[int] = []
  for t, (_, a) in enumerate(pairs):
    for g, gr in enumerate(a.get("groundings") or []):
      where = f"conversations[{2 * t + 1}].groundings[{g}]"
      s, e, rids = gr.get("start"), gr.get("end"), gr.get("region_ids")
      if not (isinstance(s, int) and isinstance(e, int) and 0 <= s < e <= len(a["text"])):
        raise FieldError(where, f"span [{s}, {e}) not inside the {len(a['text'])}-char text")
      if not rids or any(int(r) not in region_ids for r in rids):
        raise FieldError(f"{where}.region_ids", f"{rids!r} must name existing region ids")
      required += [int(r) for r in rids]
  required = list(dict.fromkeys(required))

  def make_turns(index_of, n):
    turns, answer_regions = [], []
    for t, (u, a) in enumerate(pairs):
      question = prompts.question("chat", text=u["text"].strip())
      if t == 0:
        question = prompts.build_user_text(question, n)
      else:
        question = question.replace(C.DEFAULT_IMAGE_TOKEN, "")
      spans = [(gr["start"], gr["end"], [int(r) for r in gr["region_ids"]])
               for gr in a.get("groundings") or []]
      turns.append((question, _insert_tags(a["text"], spans, index_of,
                                           f"conversations[{2 * t + 1}].groundings")))
      answer_regions += [sorted(r, key=lambda x: index_of[x]) for _, _, r in sorted(spans)]
    return turns, answer_regions
  return _finish("conversation", "conversation", record, rng, required, max_objects, proposals,
                 make_turns)
