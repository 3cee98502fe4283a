"""ChatRex's answer grammar: `<ground>phrase</ground><objects><obj3><obj7></objects>`.

Writing it: `object_tags` and `grounded` (the training targets). Reading it (two parsers):

* `parse_grounded(text, boxes)` - the official visualiser's rule, the default for every ChatRex
  answer the pipeline / `chatrex-jax predict` parse (ChatRex `chatrex/tools/visualize.py`
  `convert_all_cate_prediction_to_ans` + `visualize_chatrex_output`; RexSeek's visualiser has the
  same function): regex `<ground>(.*?)</ground><objects>(.*?)</objects>` (non-greedy, no DOTALL),
  phrase `.strip()`, tags `<obj\\d+>`, index = int(tag[4:-1]). Groups are read in answer order:
    - a group none of whose tags is new (every tag string already appeared in an earlier group,
      kept or not) is skipped, and so is a group with no tag at all;
    - otherwise its phrase, if not seen before, keeps its *full* tag list, reused tags included
      (`reused="official"`); a repeated phrase keeps its first occurrence;
    - indices >= the number of input boxes are dropped afterwards (the visualiser's
      `obj_idx < len(input_boxes)` at drawing time), so they still count as "new" tags for the
      rule above, and a first occurrence whose indices are all out of range still holds its
      phrase (nothing is drawn for it, later groups with that phrase are repeats).
  When the strict pattern finds nothing, the evaluation script's spaced variant
  (`<ground> x </ground> <objects> ... </objects>`, any number of spaces here) is tried.
  Differences from the official dict: an index repeated inside one group is kept once (the
  official list draws the same box twice); the spaced fallback above.
  Other behaviours, as explicit options: `reused="keep"` (no cross-phrase rule: every group is
  judged on its own, and a phrase is held only by a group with a usable index),
  `reused="exclusive"` (an index used by an earlier phrase is removed from later ones, a phrase
  left with none is dropped); `repeated="merge"` / `"keep"` instead of `"first"`.
  It never raises on any text; everything it ignores is listed in `ParseResult.dropped` with a
  reason (unclosed / unmatched tags, out-of-range indices, groups whose tags were all used before,
  repeated phrases, duplicate indices, stray text inside `<objects>`). Bare `<objK>` outside
  groups (a free answer such as "it is <obj0>") are reported in `mentions`.

* `parse_first_group(text, boxes)` - RexSeek `evaluate_rexseek.py`: the first phrase's tag list
  only (no index de-duplication, no cross-phrase rule), any out-of-range index or the rejection
  sentence "There is no such thing in this image" gives the official `[[]]`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, Sequence

import numpy as np

from chatrex_jax.protocol import tokens as C


def object_tags(indices: Sequence[int]) -> str:
  """`<objects><obj2><obj5></objects>` for sorted input-box indices."""
  return C.OBJECTS_START + "".join(C.object_token(int(i)) for i in sorted(indices)) + C.OBJECTS_END


def grounded(text: str, indices: Sequence[int]) -> str:
  """`<ground>{text}</ground><objects>...</objects>` (the ChatRex grounded-answer grammar)."""
  return C.GROUND_START + text + C.GROUND_END + object_tags(indices)


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
           "all_indices_used_by_earlier_phrases", "repeated_phrase", "no_valid_indices",
           "malformed_tag", "stray_objects_text")


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
                   reused: Literal["official", "keep", "exclusive"] = "official") -> ParseResult:
  """Parses every grounded group of an answer (visualiser semantics, see module doc).

  text: the decoded answer. boxes: [N, 4] input boxes (original-image xyxy) or None;
  num_boxes: the index bound when boxes are not given (default MAX_NUM_OBJECTS).
  repeated: "first" (official: later groups with the same phrase are dropped), "merge" (their
  indices are added to the first occurrence), "keep" (every group is its own entry).
  reused: how tags used by earlier groups count. "official" (default, ChatRex/RexSeek
  `convert_all_cate_prediction_to_ans`): a group with no new tag string is skipped, a kept group
  keeps its full list; "keep": no cross-group rule; "exclusive": an index already given to an
  earlier phrase is removed from later groups.
  Returns ParseResult: phrases in answer order of their first (held) occurrence, each with
  indices [K] and boxes float64 [K, 4].
  """
  if repeated not in ("first", "merge", "keep"):
    raise ValueError(f"repeated must be 'first', 'merge' or 'keep', got {repeated!r}")
  if reused not in ("official", "keep", "exclusive"):
    raise ValueError(f"reused must be 'official', 'keep' or 'exclusive', got {reused!r}")
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
  # Official rule: a phrase is held by its first non-skipped group even when none of that
  # group's indices is in range (the official dict stores it; nothing is drawn for it).
  held_empty: dict[str, tuple[int, int]] = {}
  used: set[int] = set()  # reused="exclusive": indices given to earlier phrases
  seen_tags: set[str] = set()  # reused="official": tag strings of every earlier group
  for m in matches:
    phrase = m.group(1).strip()
    obj_text = m.group(2)
    obj_start = m.start(2)
    stray = OBJ_TAG_RE.sub("", obj_text).strip()
    if stray:
      dropped.append(Dropped("stray_objects_text", stray, (obj_start, m.end(2)),
                             f"text inside <objects> of {phrase!r} that is not an <objK> tag"))
    tags = list(OBJ_TAG_RE.finditer(obj_text))
    if reused == "official":
      # The official code compares tag strings and records them before its repeated-phrase
      # check, so even a skipped repeat uses up its tags for later phrases.
      new_tags = [t.group() for t in tags if t.group() not in seen_tags]
      seen_tags.update(t.group() for t in tags)
      if tags and not new_tags:
        dropped.append(Dropped("all_indices_used_by_earlier_phrases", m.group(), m.span(),
                               f"{phrase!r}: every tag was already used by an earlier phrase"))
        continue
    indices: list[int] = []
    for t in tags:
      idx = _tag_index(t.group())
      span = (obj_start + t.start(), obj_start + t.end())
      if idx >= limit:
        dropped.append(Dropped("index_out_of_range", t.group(), span,
                               f"{phrase!r}: index {idx} >= number of boxes {limit}"))
      elif idx in indices:
        dropped.append(Dropped("duplicate_index", t.group(), span,
                               f"{phrase!r}: index {idx} repeated in the same group"))
      elif reused == "exclusive" and idx in used:
        dropped.append(Dropped("index_used_by_earlier_phrase", t.group(), span,
                               f"{phrase!r}: index {idx} already given to an earlier phrase"))
      else:
        indices.append(idx)
    if reused == "exclusive":
      used.update(indices)
    first_span = by_phrase[phrase].span if phrase in by_phrase else held_empty.get(phrase)
    if not indices:
      dropped.append(Dropped("no_valid_indices", m.group(), m.span(),
                             f"{phrase!r} has no usable object index"))
      if reused == "official" and tags and first_span is None:
        held_empty[phrase] = m.span()
      continue
    if repeated != "keep" and first_span is not None:
      first = by_phrase.get(phrase)
      if repeated == "first":
        why = ("already grounded" if first is not None else
               "held (with no usable index, as the official visualiser does)")
        dropped.append(Dropped("repeated_phrase", m.group(), m.span(),
                               f"{phrase!r} {why} at {first_span}; first kept"))
        continue
      if first is not None:  # merge into the first occurrence that has indices
        first.indices.extend(i for i in indices if i not in first.indices)
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
