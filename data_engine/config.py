"""Engine configuration: the defaults (`base_config`) and loading `FILE[:ARG]` config files
with `--config.key=value` overrides.

Every field, with its default:

  name, split            dataset name and split of the output shards ("rexverse", "train")
  sources                list of source specs (data_engine/sources.py)
  num_shards             fixed shard count, or 0: ceil(items / records_per_shard)
  records_per_shard      1000
  shards_per_wave        shards per Beam run (0: all in one run); a kill loses <= one wave
  wave_pause_s           sleep between waves (0)
  batch_size             images per batch through the model stages (8)
  timeout_s              per backend call (batch); 0 = none; a timeout is a per-item error
  filters                min_side (32), max_pixels (64e6, checked on the header before
                         decoding), nsfw_field ("nsfw"), low_content ({"kind": "stats",
                         min_std, min_foreground, tol} | {"kind": "module:Class"} | None)
  caption                use_provided (True: a manifest caption field wins), field ("caption")
  conversations          enabled (False), field ("conversations"), questions ([...])
  phrases                spacy_model ("en_core_web_sm"), min_descriptive_words (3),
                         abstract_nouns (phrases.DEFAULT_ABSTRACT_NOUNS), max_phrases (32)
  grounding              min_score (0.0 on top of the backend's thresholds), dedupe_iou (0.9),
                         max_regions (50), part_containment (0.9), part_max_area_ratio (0.5)
  verify                 threshold (0.5): regions with verifier P(match) below are dropped
  backends               vlm / grounding / verifier specs (data_engine/backends/base.py)
  beam                   runner ("DirectRunner"), direct_num_workers (1), direct_running_mode
                         ("in_memory"), pipeline_args ([] extra Beam flags, e.g. for Dataflow)
"""
from __future__ import annotations

import ml_collections

from data_engine.phrases import DEFAULT_ABSTRACT_NOUNS


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "rexverse"
  c.split = "train"
  c.sources = []
  c.num_shards = 0
  c.records_per_shard = 1000
  c.shards_per_wave = 8
  c.wave_pause_s = 0.0
  c.batch_size = 8
  c.timeout_s = 0.0
  c.filters = ml_collections.ConfigDict({
      "min_side": 32, "max_pixels": 64_000_000, "nsfw_field": "nsfw",
      "low_content": {"kind": "stats", "min_std": 4.0, "min_foreground": 0.01, "tol": 24}})
  c.caption = ml_collections.ConfigDict({"use_provided": True, "field": "caption"})
  c.conversations = ml_collections.ConfigDict({
      "enabled": False, "field": "conversations",
      "questions": ["Describe the main objects in this image."]})
  c.phrases = ml_collections.ConfigDict({
      "spacy_model": "en_core_web_sm", "min_descriptive_words": 3,
      "abstract_nouns": list(DEFAULT_ABSTRACT_NOUNS), "max_phrases": 32})
  c.grounding = ml_collections.ConfigDict({
      "min_score": 0.0, "dedupe_iou": 0.9, "max_regions": 50, "part_containment": 0.9,
      "part_max_area_ratio": 0.5})
  c.verify = ml_collections.ConfigDict({"threshold": 0.5})
  c.backends = ml_collections.ConfigDict()
  c.beam = ml_collections.ConfigDict({
      "runner": "DirectRunner", "direct_num_workers": 1, "direct_running_mode": "in_memory",
      "pipeline_args": []})
  return c


def to_plain(config) -> dict:
  """ConfigDict (possibly holding dicts/lists) -> plain JSON-able dict."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  if isinstance(config, dict):
    return {k: to_plain(v) for k, v in config.items()}
  if isinstance(config, (list, tuple)):
    return [to_plain(v) for v in config]
  return config
