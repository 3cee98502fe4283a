"""Stage 7: ArrayRecord shards, per-shard completion markers, error logs, the manifest and
the TFDS metadata.

Output directory layout::

    DIR/{name}-{split}.array_record-00000-of-00004   records (schema.py), sorted by key
    DIR/errors/shard-00000.jsonl                     per-item errors: key, stage, reason, detail
    DIR/_state/plan.json                             fingerprint of config + inputs, num_shards
    DIR/_state/shard-00000.done.json                 completion marker + per-shard statistics
    DIR/_state/runs.jsonl                            one line per run (timings; not compared)
    DIR/manifest.json                                counts, schema version, sources, config
    DIR/dataset_info.json, DIR/features.json         TFDS metadata (tfds.builder_from_directory)

Resumability: a shard is complete iff its marker exists. Every file is written to a
temporary name and `os.replace`d (atomic on POSIX), the marker last, so a kill at any
moment leaves either a complete shard or one that the next run rewrites from scratch.
Shard contents are a pure function of the inputs and the config (records sorted by key),
so reruns are byte-identical.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable
import uuid

from chatrex_jax.data import schema

STATE = "_state"
ERRORS = "errors"
ARRAY_RECORD_OPTIONS = "group_size:1"  # random access for Grain


def atomic_write(path: str, data: bytes | str) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  with open(tmp, "wb") as f:
    f.write(data.encode("utf-8") if isinstance(data, str) else data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def marker_path(out: str, shard: int) -> str:
  return os.path.join(out, STATE, f"shard-{shard:05d}.done.json")


def error_path(out: str, shard: int) -> str:
  return os.path.join(out, ERRORS, f"shard-{shard:05d}.jsonl")


def is_done(out: str, shard: int) -> bool:
  return os.path.exists(marker_path(out, shard))


def write_array_record(path: str, records: Iterable[bytes]) -> int:
  """Write records to `path` atomically; returns the byte size."""
  from array_record.python.array_record_module import ArrayRecordWriter
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  writer = ArrayRecordWriter(tmp, ARRAY_RECORD_OPTIONS)
  try:
    for r in records:
      writer.write(r)
  finally:
    writer.close()
  os.replace(tmp, path)
  return os.path.getsize(path)


def shard_stats(items: list[dict[str, Any]]) -> dict[str, Any]:
  """Per-stage counts: in / passed / dropped{reason} / errors{reason}; region drops."""
  stages: dict[str, dict[str, Any]] = {}

  def st(name):
    return stages.setdefault(name, {"in": 0, "passed": 0, "dropped": {}, "errors": {}})

  regions: dict[str, int] = {}
  for it in items:
    for name in it["passed"]:
      st(name)["in"] += 1
      st(name)["passed"] += 1
    if it["status"] != "ok":
      s = st(it["stage"])
      s["in"] += 1
      bucket = s["dropped"] if it["status"] == "dropped" else s["errors"]
      bucket[it["reason"]] = bucket.get(it["reason"], 0) + 1
    for reason, n in it.get("region_drops", {}).items():
      regions[reason] = regions.get(reason, 0) + n
  return {"stages": stages, "region_drops": regions}


def write_shard(out: str, name: str, split: str, shard: int, num_shards: int,
                items: Iterable[dict[str, Any]]) -> dict[str, Any]:
  """Write one shard (records, error log, then the marker). Returns the marker dict."""
  items = sorted(items, key=lambda it: it["key"])
  keys = [it["key"] for it in items]
  if len(set(keys)) != len(keys):
    raise RuntimeError(f"shard {shard}: duplicate keys in the input")
  kept = [it for it in items if it["status"] == "ok"]
  errors = [it for it in items if it["status"] == "error"]
  lines = "".join(json.dumps({k: it[k] for k in ("key", "source", "item_id", "stage", "reason",
                                                  "detail")}, sort_keys=True) + "\n"
                  for it in errors)
  atomic_write(error_path(out, shard), lines)
  fname = schema.shard_filename(name, split, shard, num_shards)
  size = write_array_record(os.path.join(out, fname), [it["record"] for it in kept])
  marker = {
      "shard": shard, "file": fname, "num_records": len(kept), "num_items": len(items),
      "num_errors": len(errors), "num_dropped": sum(it["status"] == "dropped" for it in items),
      "num_regions": sum(it.get("num_regions", 0) for it in kept), "bytes": size,
      "keys_sha1": hashlib.sha1("\n".join(keys).encode()).hexdigest(),
      **shard_stats(items),
  }
  atomic_write(marker_path(out, shard), json.dumps(marker, sort_keys=True, indent=1))
  return marker


def read_markers(out: str, num_shards: int) -> list[dict[str, Any]]:
  markers = []
  for i in range(num_shards):
    with open(marker_path(out, i)) as f:
      markers.append(json.load(f))
  return markers


def merge_stats(markers: list[dict[str, Any]]) -> dict[str, Any]:
  stages: dict[str, dict[str, Any]] = {}
  regions: dict[str, int] = {}
  for m in markers:
    for name, s in m["stages"].items():
      t = stages.setdefault(name, {"in": 0, "passed": 0, "dropped": {}, "errors": {}})
      t["in"] += s["in"]
      t["passed"] += s["passed"]
      for kind in ("dropped", "errors"):
        for r, n in s[kind].items():
          t[kind][r] = t[kind].get(r, 0) + n
    for r, n in m["region_drops"].items():
      regions[r] = regions.get(r, 0) + n
  order = {s: i for i, s in enumerate(("load", "filter", "caption", "converse", "phrases",
                                        "ground", "describe", "verify", "finalize"))}
  stages = dict(sorted(stages.items(), key=lambda kv: order.get(kv[0], 99)))
  return {"stages": stages, "region_drops": dict(sorted(regions.items()))}


def write_manifest(out: str, *, name: str, split: str, config: dict[str, Any],
                   sources: list[dict[str, Any]], markers: list[dict[str, Any]],
                   engine_version: str) -> dict[str, Any]:
  """manifest.json + TFDS dataset_info.json/features.json (deterministic: no timestamps)."""
  stats = merge_stats(markers)
  num_records = sum(m["num_records"] for m in markers)
  manifest = {
      "name": name, "schema_version": schema.SCHEMA_VERSION, "engine_version": engine_version,
      "record_format": "tf.train.Example{key, image, meta_json} in ArrayRecord (see "
                       "chatrex_jax/data/schema.py)",
      "splits": {split: {"num_records": num_records, "shards": [
          {"file": m["file"], "num_records": m["num_records"], "bytes": m["bytes"]}
          for m in markers]}},
      "counts": {"items": sum(m["num_items"] for m in markers), "records": num_records,
                 "regions": sum(m["num_regions"] for m in markers),
                 "dropped": sum(m["num_dropped"] for m in markers),
                 "errors": sum(m["num_errors"] for m in markers)},
      "stages": stats["stages"], "region_drops": stats["region_drops"],
      "sources": sources, "config": config,
      "synthetic": any(s.get("kind") == "synthetic" for s in sources),
  }
  atomic_write(os.path.join(out, "manifest.json"), json.dumps(manifest, sort_keys=True, indent=1))
  _write_tfds_metadata(out, name, split, markers)
  return manifest


def _write_tfds_metadata(out: str, name: str, split: str, markers: list[dict[str, Any]]) -> None:
  """TFDS `dataset_info.json` + `features.json`, so that
  `tfds.builder_from_directory(out).as_data_source(split)` reads the shards."""
  text = {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text", "text": {}}
  features = {
      "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
      "featuresDict": {"features": {
          "key": text,
          "image": {"pythonClassName": "tensorflow_datasets.core.features.tensor_feature.Tensor",
                    "tensor": {"shape": {}, "dtype": "string", "encoding": "none"}},
          "meta_json": text,
      }},
  }
  info = {
      "name": name, "version": "1.0.0", "fileFormat": "array_record",
      "moduleName": "data_engine",
      "description": "Rexverse-style image-region-text records made by chatrex-jax's data "
                     "engine; meta_json holds the record fields (chatrex_jax/data/schema.py).",
      "splits": [{"name": split, "numBytes": str(sum(m["bytes"] for m in markers)),
                  "shardLengths": [str(m["num_records"]) for m in markers],
                  "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"}],
      "releaseNotes": {"1.0.0": f"schema_version {schema.SCHEMA_VERSION}"},
  }
  atomic_write(os.path.join(out, "features.json"), json.dumps(features, indent=1))
  atomic_write(os.path.join(out, "dataset_info.json"), json.dumps(info, indent=1))
