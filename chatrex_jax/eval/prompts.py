"""Detection prompts for large category lists (LVIS: 1,203 names) and merging their answers.

ChatRex detects several categories with one question, "Please detect cat; dog in this image.
Answer the question with object indexes." (docs/architecture.md C, the "; "-joined [OBJ]). A long list does not
fit one prompt, so `chunk_categories` packs the names, in order, into as few chunks as fit a
budget, measured on the whole question string: `max_chars` characters and/or `max_tokens`
tokens of a tokenizer (`len(tokenizer.encode(question, add_special_tokens=False))`). Every
category lands in exactly one chunk. `merge_answers` maps each chunk's parsed phrases back to
its categories (phrases matched by a normalised name) and returns per-category box indices.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from chatrex_jax.protocol import prompts as protocol_prompts


def normalize(name: str) -> str:
  """Matching key: lower-case, "_" -> " ", whitespace collapsed."""
  return " ".join(str(name).replace("_", " ").lower().split())


def display_name(name: str) -> str:
  """LVIS-style name to prompt text: "bow_(weapon)" -> "bow (weapon)"."""
  return " ".join(str(name).replace("_", " ").split())


@dataclasses.dataclass
class PromptChunk:
  """categories: the category keys (as given) in this chunk; names: their prompt texts;
  question: the detection question."""
  categories: list[Any]
  names: list[str]
  question: str


def detect_question(names: Sequence[str], variant: int = 0) -> str:
  return protocol_prompts.question("detect", list(names), variant=variant)


def chunk_categories(categories: Sequence[Any] | Mapping[Any, str], *, max_chars: int | None = None,
                     max_tokens: int | None = None, tokenizer=None, variant: int = 0,
                     name_fn: Callable[[str], str] = display_name) -> list[PromptChunk]:
  """Greedy in-order packing of categories into detection questions under the budget(s).

  categories: a list of names, or {category_id: name}. The keys of the returned chunks are the
  names (list input) or the ids (mapping input). Raises ValueError on duplicate (normalised)
  names, names containing ";" (the separator), or a single name that alone exceeds the budget.
  """
  if max_chars is None and max_tokens is None:
    raise ValueError("give max_chars and/or max_tokens")
  if max_tokens is not None and tokenizer is None:
    raise ValueError("max_tokens needs a tokenizer")
  items = list(categories.items()) if isinstance(categories, Mapping) else [(c, c) for c in categories]
  if not items:
    raise ValueError("no categories")
  seen: dict[str, Any] = {}
  for key, name in items:
    if ";" in str(name):
      raise ValueError(f"category {name!r} contains ';', the prompt separator")
    n = normalize(name)
    if not n:
      raise ValueError(f"category {key!r} has an empty name")
    if n in seen:
      raise ValueError(f"categories {seen[n]!r} and {key!r} share the name {n!r}; answers could "
                       "not be told apart")
    seen[n] = key

  def fits(names: list[str]) -> bool:
    q = detect_question(names, variant)
    if max_chars is not None and len(q) > max_chars:
      return False
    if max_tokens is not None and len(tokenizer.encode(q, add_special_tokens=False)) > max_tokens:
      return False
    return True

  chunks: list[PromptChunk] = []
  keys: list[Any] = []
  names: list[str] = []
  for key, name in items:
    text = name_fn(str(name))
    if names and fits(names + [text]):
      keys.append(key)
      names.append(text)
      continue
    if names:
      chunks.append(PromptChunk(keys, names, detect_question(names, variant)))
    if not fits([text]):
      raise ValueError(f"category {name!r} alone exceeds the budget (max_chars={max_chars}, "
                       f"max_tokens={max_tokens})")
    keys, names = [key], [text]
  chunks.append(PromptChunk(keys, names, detect_question(names, variant)))
  return chunks


@dataclasses.dataclass
class MergedDetections:
  """per_category: {category key: [box indices]} for every category of the chunks (empty list
  when not detected); unmatched: (chunk index, phrase) answers that name no category of their
  chunk."""
  per_category: dict[Any, list[int]]
  unmatched: list[tuple[int, str]]


def merge_answers(chunks: Sequence[PromptChunk], parsed: Sequence[Any]) -> MergedDetections:
  """Merges per-chunk parse results (`parser.ParseResult`, or lists of (phrase, indices) pairs /
  dicts with "phrase" and "indices") into per-category index lists. A phrase is credited to the
  category of *its own chunk* with the same normalised name; indices of repeated phrases are
  united in answer order without duplicates."""
  if len(chunks) != len(parsed):
    raise ValueError(f"{len(chunks)} chunks but {len(parsed)} answers")
  per: dict[Any, list[int]] = {}
  unmatched: list[tuple[int, str]] = []
  for ci, (chunk, result) in enumerate(zip(chunks, parsed)):
    table = {normalize(n): k for k, n in zip(chunk.categories, chunk.names)}
    for k in chunk.categories:
      if k in per:
        raise ValueError(f"category {k!r} appears in more than one chunk")
      per[k] = []
    phrases = result.phrases if hasattr(result, "phrases") else result
    for p in phrases:
      if isinstance(p, Mapping):
        phrase, idx = p["phrase"], p["indices"]
      elif hasattr(p, "phrase"):
        phrase, idx = p.phrase, p.indices
      else:
        phrase, idx = p
      key = table.get(normalize(phrase))
      if key is None:
        unmatched.append((ci, phrase))
        continue
      for i in idx:
        if int(i) not in per[key]:
          per[key].append(int(i))
  return MergedDetections(per, unmatched)
