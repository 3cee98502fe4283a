"""Read the data engine's output (ArrayRecord shards + manifest.json) for Grain or by hand.

    src = EngineRecords("/data/rexverse")         # random access, Grain-compatible
    len(src); rec = src[0]                         # a decoded record dict (see schema.py)
    grain.MapDataset.source(src) ...               # or grain.DataLoader(data_source=src, ...)

`tfds_data_source(dir)` opens the same directory through TFDS when it is installed.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from chatrex_jax.data import schema

MANIFEST = "manifest.json"


def read_manifest(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no manifest; the engine run into {directory} is not finished")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("schema_version", 0) > schema.SCHEMA_VERSION:
    raise schema.SchemaError(f"{path}: schema_version {manifest['schema_version']} is newer than "
                             f"this reader ({schema.SCHEMA_VERSION})")
  return manifest


def shard_paths(directory: str, split: str = "train") -> list[str]:
  """The ArrayRecord shard paths of a finished engine output, in shard order."""
  manifest = read_manifest(directory)
  shards = manifest["splits"][split]["shards"]
  return [os.path.join(directory, s["file"]) for s in shards]


def read_shard(path: str) -> list[bytes]:
  """All serialized records of one ArrayRecord shard, in order."""
  from array_record.python.array_record_module import ArrayRecordReader
  reader = ArrayRecordReader(path)
  try:
    return list(reader.read_all())
  finally:
    reader.close()


class EngineRecords(Sequence):
  """Random-access source of decoded records (Grain `RandomAccessDataSource` protocol)."""

  def __init__(self, directory_or_paths: str | Sequence[str], split: str = "train",
               check: bool = False):
    if isinstance(directory_or_paths, str):
      paths = shard_paths(directory_or_paths, split)
    else:
      paths = list(directory_or_paths)
    from grain.python import ArrayRecordDataSource
    self._paths = paths
    self._source = ArrayRecordDataSource(paths) if paths else None
    self._check = check

  def __len__(self) -> int:
    return 0 if self._source is None else len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
    if self._source is None:
      raise IndexError(index)
    return schema.decode(self._source[index], check=self._check)

  def __repr__(self) -> str:
    return f"EngineRecords({len(self._paths)} shards, {len(self)} records)"


def iter_records(directory: str, split: str = "train", check: bool = False):
  """Yield decoded records shard by shard (sequential; no Grain needed)."""
  for path in shard_paths(directory, split):
    for buf in read_shard(path):
      yield schema.decode(buf, check=check)


def tfds_data_source(directory: str, split: str = "train"):
  """`tfds.builder_from_directory(directory).as_data_source(split)` (needs tensorflow-datasets).

  Elements are dicts with the features `key`, `image` and `meta_json`; pass
  `schema.encode_example`-style dicts to `decode_features` to get a record dict.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:  # pragma: no cover - optional dependency
    raise ImportError("tfds_data_source needs `pip install chatrex-jax[tf]`") from e
  return tfds.builder_from_directory(directory).as_data_source(split=split)


def decode_features(element: dict[str, Any]) -> dict[str, Any]:
  """A TFDS element {'key','image','meta_json'} -> record dict."""
  def as_bytes(v):
    v = getattr(v, "item", lambda: v)() if hasattr(v, "shape") else v
    return v if isinstance(v, bytes) else str(v).encode("utf-8")
  feats = {k: [as_bytes(element[k])] for k in schema.FEATURE_KEYS}
  return schema.decode(schema.encode_example(feats))
