"""Parsing ChatRex answers: `<ground>phrase</ground><objects><obj3><obj7></objects>` -> boxes.

Spec B.10. Two parsers:

* `parse_grounded(text, boxes)` - the visualiser's behaviour (ChatRex `tools/visualize.py`):
  regex `<ground>(.*?)</ground><objects>(.*?)</objects>` (non-greedy, no DOTALL), phrase
  `.strip()`, tags `<obj\\d+>`, index = int(tag[4:-1]), indices >= the number of input boxes
  dropped, a repeated phrase keeps its first occurrence. When the strict pattern finds nothing,
  the evaluation script's spaced variant (`<ground> x </ground> <objects> ... </objects>`,
  any number of spaces here) is tried. Options: `repeated="merge"` / `"keep"` instead of
  `"first"`, and `exclusive_indices=True` for RexSeek's visualiser rule (an index used by an
  earlier phrase is skipped; a phrase left with none is dropped - RexSeek then stores the
  *unfiltered* list, a bug not copied: the filtered list is kept).
  Deliberate difference: a phrase whose first group has no usable index is dropped, so a later
  group with the same phrase and valid indices is kept (the official dict would keep the
  useless first one and draw nothing).
  It never raises on any text; everything it ignores is listed in `ParseResult.dropped` with a
  reason (unclosed / unmatched tags, out-of-range indices, repeated phrases, duplicate indices,
  stray text inside `<objects>`). Bare `<objK>` outside groups (a free answer such as "it is
  <obj0>") are reported in `mentions`.

* `parse_first_group(text, boxes)` - RexSeek `evaluate_rexseek.py`: the first phrase's tag list
  only (no index de-duplication), any out-of-range index or the rejection sentence
  "There is no such thing in this image" gives the official `[[]]`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, Sequence

import numpy as np

from chatrex_jax.data import constants as C

GROUP_RE = re.compile(r"<ground>(.*?)</ground><objects>(.*?)</objects>")
SPACED_GROUP_RE = re.compile(r"<ground> +(.*?) +</ground> *<objects> +(.*?) +</objects>")
OFFICIAL_SPACED_GROUP_RE = re.compile(r"<ground> (.*?) </ground> <objects> (.*?) </objects>")
OBJ_TAG_RE = re.compile(r"<obj\d+>")
ANY_TAG_RE = re.compile(r"</?ground>|</?objects>")
REJECTION = "There is no such thing in this image"


@dataclasses.dataclass
class GroundedPhrase:
  """phrase: stripped text; indices: input-box indices (valid, in answer order);
  boxes: float64 [K, 4] xyxy in the original image (empty when no boxes were given);
  span: (start, end) character span of the group in the answer."""
  phrase: str
  indices: list[int]
  boxes: np.ndarray
  span: tuple[int, int]

  def to_dict(self) -> dict:
    return {"phrase": self.phrase, "indices": list(self.indices),
            "boxes": np.asarray(self.boxes).tolist(), "span": list(self.span)}


@dataclasses.dataclass
class Dropped:
  """Something the parser ignored. reason: one of REASONS; text: the fragment;
  span: its character span (None when not applicable); detail: human-readable explanation."""
  reason: str
  text: str
  span: tuple[int, int] | None
  detail: str = ""

  def to_dict(self) -> dict:
    return {"reason": self.reason, "text": self.text,
            "span": None if self.span is None else list(self.span), "detail": self.detail}


REASONS = ("index_out_of_range", "duplicate_index", "index_used_by_earlier_phrase",
           "repeated_phrase", "no_valid_indices", "malformed_tag", "stray_objects_text")


@dataclasses.dataclass
class ParseResult:
  phrases: list[GroundedPhrase]
  dropped: list[Dropped]
  mentions: list[int]
  rejected: bool
  used_spaced_variant: bool = False

  def to_dict(self) -> dict:
    return {"phrases": [p.to_dict() for p in self.phrases],
            "dropped": [d.to_dict() for d in self.dropped], "mentions": list(self.mentions),
            "rejected": self.rejected, "used_spaced_variant": self.used_spaced_variant}


def _as_boxes(boxes) -> np.ndarray | None:
  if boxes is None:
    return None
  b = np.asarray(boxes, np.float64)
  if b.size == 0:
    return np.zeros((0, 4), np.float64)
  if b.ndim != 2 or b.shape[1] != 4:
    raise ValueError(f"boxes must be [N, 4] xyxy, got shape {b.shape}")
  return b


def _limit(boxes: np.ndarray | None, num_boxes: int | None) -> int:
  """Number of valid indices: len(boxes), else num_boxes, else MAX_NUM_OBJECTS."""
  if boxes is not None:
    return boxes.shape[0]
  return C.MAX_NUM_OBJECTS if num_boxes is None else int(num_boxes)


_HUGE_INDEX = 10**9


def _tag_index(tag: str) -> int:
  """int(tag[4:-1]) as the official code; absurdly long digit runs (which Python's int() may
  refuse) map to a huge out-of-range index instead of raising."""
  digits = tag[4:-1]
  return int(digits) if len(digits) <= 9 else _HUGE_INDEX


def parse_grounded(text: str, boxes=None, *, num_boxes: int | None = None,
                   repeated: Literal["first", "merge", "keep"] = "first",
                   exclusive_indices: bool = False) -> ParseResult:
  """Parses every grounded group of an answer (visualiser semantics, see module doc).

  text: the decoded answer. boxes: [N, 4] input boxes (original-image xyxy) or None;
  num_boxes: the index bound when boxes are not given (default MAX_NUM_OBJECTS).
  repeated: "first" (official: later groups with the same phrase are dropped), "merge" (their
  indices are added to the first occurrence), "keep" (every group is its own entry).
  exclusive_indices: skip indices already used by an earlier phrase (RexSeek visualiser).
  """
  if repeated not in ("first", "merge", "keep"):
    raise ValueError(f"repeated must be 'first', 'merge' or 'keep', got {repeated!r}")
  text = "" if text is None else str(text)
  b = _as_boxes(boxes)
  limit = _limit(b, num_boxes)
  dropped: list[Dropped] = []
  matches = list(GROUP_RE.finditer(text))
  spaced = False
  if not matches:
    matches = list(SPACED_GROUP_RE.finditer(text))
    spaced = bool(matches)

  phrases: list[GroundedPhrase] = []
  by_phrase: dict[str, GroundedPhrase] = {}
  used: set[int] = set()
  for m in matches:
    phrase = m.group(1).strip()
    obj_text = m.group(2)
    obj_start = m.start(2)
    stray = OBJ_TAG_RE.sub("", obj_text).strip()
    if stray:
      dropped.append(Dropped("stray_objects_text", stray, (obj_start, m.end(2)),
                             f"text inside <objects> of {phrase!r} that is not an <objK> tag"))
    indices: list[int] = []
    for t in OBJ_TAG_RE.finditer(obj_text):
      idx = _tag_index(t.group())
      span = (obj_start + t.start(), obj_start + t.end())
      if idx >= limit:
        dropped.append(Dropped("index_out_of_range", t.group(), span,
                               f"{phrase!r}: index {idx} >= number of boxes {limit}"))
      elif idx in indices:
        dropped.append(Dropped("duplicate_index", t.group(), span,
                               f"{phrase!r}: index {idx} repeated in the same group"))
      elif exclusive_indices and idx in used:
        dropped.append(Dropped("index_used_by_earlier_phrase", t.group(), span,
                               f"{phrase!r}: index {idx} already given to an earlier phrase"))
      else:
        indices.append(idx)
    if exclusive_indices:
      used.update(indices)
    if not indices:
      dropped.append(Dropped("no_valid_indices", m.group(), m.span(),
                             f"{phrase!r} has no usable object index"))
      continue
    if repeated != "keep" and phrase in by_phrase:
      first = by_phrase[phrase]
      if repeated == "first":
        dropped.append(Dropped("repeated_phrase", m.group(), m.span(),
                               f"{phrase!r} already grounded at {first.span}; first kept"))
        continue
      new = [i for i in indices if i not in first.indices]
      first.indices.extend(new)
      first.boxes = _boxes_for(b, first.indices)
      continue
    entry = GroundedPhrase(phrase, indices, _boxes_for(b, indices), m.span())
    phrases.append(entry)
    by_phrase.setdefault(phrase, entry)

  # Everything outside the matched groups: unmatched tags and bare <objK> mentions.
  mentions: list[int] = []
  pos = 0
  for start, end in [m.span() for m in matches] + [(len(text), len(text))]:
    for t in ANY_TAG_RE.finditer(text, pos, start):
      dropped.append(Dropped("malformed_tag", t.group(), t.span(),
                             "tag outside a complete <ground>..</ground><objects>..</objects> "
                             "group (unclosed, unmatched or split by a newline)"))
    for t in OBJ_TAG_RE.finditer(text, pos, start):
      idx = _tag_index(t.group())
      if idx < limit:
        if idx not in mentions:
          mentions.append(idx)
      else:
        dropped.append(Dropped("index_out_of_range", t.group(), t.span(),
                               f"mention of index {idx} >= number of boxes {limit}"))
    pos = end
  dropped.sort(key=lambda d: (d.span or (len(text), len(text)))[0])
  return ParseResult(phrases, dropped, mentions, REJECTION in text, spaced)


def _boxes_for(boxes: np.ndarray | None, indices: Sequence[int]) -> np.ndarray:
  if boxes is None:
    return np.zeros((0, 4), np.float64)
  return boxes[np.asarray(indices, np.int64)] if indices else np.zeros((0, 4), np.float64)


@dataclasses.dataclass
class FirstGroupResult:
  """RexSeek evaluation parse. indices / boxes: the first phrase's (empty on failure);
  failure: None, or why the official code would give [[]]."""
  phrase: str | None
  indices: list[int]
  boxes: list[list[float]]
  failure: str | None

  @property
  def extracted_predictions(self) -> list[list[float]]:
    """The official `extracted_predictions` field: [[]] on any failure, else the boxes
    (an empty list when the first phrase has no tags, as the official code)."""
    return [[]] if self.failure is not None else self.boxes


def parse_first_group(text: str, boxes=None) -> FirstGroupResult:
  """RexSeek `evaluate_rexseek.py` parsing (strict regex, then the exact spaced variant; first
  phrase, its full tag list; an index beyond the boxes or the rejection sentence -> [[]])."""
  text = "" if text is None else str(text)
  b = _as_boxes(boxes)
  matches = GROUP_RE.findall(text) or OFFICIAL_SPACED_GROUP_RE.findall(text)
  ans: dict[str, list[str]] = {}
  for ground, objects in matches:
    ans.setdefault(ground.strip(), OBJ_TAG_RE.findall(objects))
  if REJECTION in text:
    return FirstGroupResult(None, [], [], "rejection sentence")
  if not ans:
    return FirstGroupResult(None, [], [], "no grounded group")
  phrase, tags = next(iter(ans.items()))
  indices = [_tag_index(t) for t in tags]  # official: int(re.findall(r"\d+", tag)[0])
  limit = _limit(b, None)
  bad = [i for i in indices if i >= limit]
  if bad:
    return FirstGroupResult(phrase, [], [], f"indices {bad} >= number of boxes {limit}")
  out_boxes = [] if b is None else [b[i].tolist() for i in indices]
  return FirstGroupResult(phrase, indices, out_boxes, None)


def to_json(result: ParseResult | FirstGroupResult) -> dict[str, Any]:
  """A JSON-serialisable dict of a parse result."""
  if isinstance(result, FirstGroupResult):
    return {"phrase": result.phrase, "indices": result.indices, "boxes": result.boxes,
            "failure": result.failure, "extracted_predictions": result.extracted_predictions}
  return result.to_dict()
