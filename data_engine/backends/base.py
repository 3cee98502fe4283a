"""The three small model interfaces of the engine, and the backend factory.

Every backend has `name` and `version` (they go into each record's provenance) and is
built from a plain config dict `{"kind": ..., **params}` by `build(spec)`; kinds:

* `hf_vlm`, `hf_grounding`, `hf_verifier`: transformers models from LOCAL directories
  (`backends/hf.py`; never downloaded from a hub).
* `oracle_vlm`, `oracle_grounding`, `oracle_verifier`: SYNTHETIC-SCENES ONLY oracles that
  answer from the scene ground truth (`backends/oracle.py`); tests and the demo only.
* `"package.module:ClassName"`: any class implementing the interface below.

`build` caches instances per process (keyed by the spec), so a model used by two stages
(the VLM captions images and describes regions) is loaded once per worker.

Images are RGB uint8 numpy arrays [H, W, 3]; boxes are [x1, y1, x2, y2] pixels of that
array; `metas` are the items' metadata dicts (manifest fields; synthetic scenes add
"scene"), one per query, which real backends ignore.
"""
from __future__ import annotations

import abc
import importlib
import json
import threading
from typing import Any, Sequence

import numpy as np

Box = list  # [x1, y1, x2, y2] in pixels


class Backend(abc.ABC):  # noqa: B024 - the interfaces below declare the abstract methods
  name: str = "backend"
  version: str = "0"

  @property
  def provenance(self) -> str:
    return f"{self.name}@{self.version}"


class VisionLanguageBackend(Backend):
  """Image captioning, phrase-conditioned region description and visual Q&A."""

  @abc.abstractmethod
  def caption(self, images: Sequence[np.ndarray], metas: Sequence[dict]) -> list[str]:
    """One detailed caption per image."""

  @abc.abstractmethod
  def describe_regions(self, images: Sequence[np.ndarray], boxes: Sequence[Box],
                       phrases: Sequence[str], metas: Sequence[dict]) -> list[str]:
    """One detailed description per (image, box, phrase) query."""

  @abc.abstractmethod
  def answer(self, images: Sequence[np.ndarray], questions: Sequence[str],
             metas: Sequence[dict]) -> list[str]:
    """One answer per (image, question) query (grounded-conversation variant)."""


class GroundingBackend(Backend):
  """Open-set detection: each (image, phrase) query -> [(box, score), ...], best first."""

  @abc.abstractmethod
  def ground(self, images: Sequence[np.ndarray], phrases: Sequence[str],
             metas: Sequence[dict]) -> list[list[tuple[Box, float]]]:
    ...


class VerifierBackend(Backend):
  """Checks a region description against its phrase and rewrites it as a referring
  expression."""

  @abc.abstractmethod
  def verify(self, phrases: Sequence[str], descriptions: Sequence[str],
             metas: Sequence[dict]) -> list[float]:
    """P(description matches phrase) in [0, 1] per pair."""

  @abc.abstractmethod
  def rewrite(self, phrases: Sequence[str], descriptions: Sequence[str], boxes: Sequence[Box],
              metas: Sequence[dict]) -> list[str]:
    """A concise referring expression per pair ("" if the backend has none)."""


_KINDS = {
    "hf_vlm": "data_engine.backends.hf:HFVisionLanguage",
    "hf_grounding": "data_engine.backends.hf:HFGrounding",
    "hf_verifier": "data_engine.backends.hf:HFVerifier",
    "oracle_vlm": "data_engine.backends.oracle:OracleVisionLanguage",
    "oracle_grounding": "data_engine.backends.oracle:OracleGrounding",
    "oracle_verifier": "data_engine.backends.oracle:OracleVerifier",
}
_CACHE: dict[str, Backend] = {}
_LOCK = threading.Lock()


def build(spec: dict[str, Any]) -> Backend:
  """Backend from a config dict; one instance per (process, spec)."""
  spec = dict(spec)
  cache_key = json.dumps(spec, sort_keys=True, default=str)
  with _LOCK:
    if cache_key not in _CACHE:
      kind = spec.pop("kind")
      target = _KINDS.get(kind, kind)
      if ":" not in target:
        raise ValueError(f"unknown backend kind {kind!r}: one of {sorted(_KINDS)} or "
                         "'package.module:ClassName'")
      module, _, cls = target.partition(":")
      _CACHE[cache_key] = getattr(importlib.import_module(module), cls)(**spec)
    return _CACHE[cache_key]


def clear_cache() -> None:
  with _LOCK:
    _CACHE.clear()
