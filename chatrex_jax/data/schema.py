"""The engine record: the one versioned schema shared by `data_engine/` (writer) and
`chatrex_jax/data/` (Grain readers).

No Beam, spaCy, TensorFlow or JAX imports here: this module is plain Python + the standard
library so every reader (Grain worker, TFDS, a notebook) can decode records.

Schema version 1
================
One record per image. In memory a record is a dict (`decode` returns one, `encode` takes one):

=================  ==========  =============================================================
field              type        meaning
=================  ==========  =============================================================
schema_version     int         `SCHEMA_VERSION` (1). Readers refuse newer versions.
key                str         stable id: the same input always gives the same key
                               (`make_key(source, item_id)`), 1..128 chars of [0-9a-z_-].
source             str         name of the source the image came from (config `sources[i].name`).
item_id            str         the item's id inside its source (path, manifest id, index).
image              bytes       the encoded image exactly as received (PNG/JPEG/...).
image_format       str         PIL format name of `image` ("PNG", "JPEG", ...).
width, height      int         size of the original image in pixels (>= 1).
caption            str         image-level caption.
caption_provenance dict        {"backend": str, "version": str} of the caption producer.
regions            list[dict]  see below; may be empty only if the config keeps such images.
proposals          dict|None   optional UPN proposals {"boxes": [[x1,y1,x2,y2], ...],
                               "scores": [float, ...], "provenance": str}.
conversations      list[dict]  optional grounded conversation (possibly empty): turns
                               {"role": "user"|"assistant", "text": str,
                                "groundings": [{"start": int, "end": int,
                                                "region_ids": [int, ...]}]}; the span
                               text[start:end] is grounded to the listed regions.
extra              dict        free-form JSON metadata of the source (e.g. the synthetic
                               scene's object attributes); never needed to train.
=================  ==========  =============================================================

Each region:

=============  ==========  ===============================================================
id             int         unique inside the record (0..n-1 in order).
box            [4 floats]  x1, y1, x2, y2 in pixels of the ORIGINAL image,
                           0 <= x1 < x2 <= width, 0 <= y1 < y2 <= height.
category       str         category name (head noun of the phrase, e.g. "circle").
phrase         str         short phrase the box was grounded from (e.g. "large red circle").
description    str         detailed phrase-conditioned region description.
referring      str         concise referring expression (e.g. "the large red circle").
score          float       grounding score in [0, 1].
verify_score   float       verifier's match probability in [0, 1].
granularity    str         "coarse" (whole object) or "fine" (a part of another region).
provenance     dict        {"phrase"|"box"|"description"|"referring"|"verify": "<backend>@<version>"}.
=============  ==========  ===============================================================

On disk
-------
Each record is a `tf.train.Example` protobuf (encoded here by hand, so TensorFlow is never
needed) with three bytes features: ``key`` (utf-8), ``image`` (the encoded image) and
``meta_json`` (every other field as UTF-8 JSON, sorted keys). Records live in ArrayRecord
shards named like TFDS does (``{name}-{split}.array_record-{i:05d}-of-{n:05d}``), next to a
``manifest.json`` (counts, schema version, sources, engine config) and TFDS metadata
(``dataset_info.json``, ``features.json``), so `tfds.builder_from_directory(dir)` can also
read the output when TFDS is installed.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from typing import Any, Iterable

from chatrex_jax.errors import UserError

SCHEMA_VERSION = 1
GRANULARITIES = ("coarse", "fine")
ROLES = ("user", "assistant")
FEATURE_KEYS = ("key", "image", "meta_json")  # the tf.train.Example features
_KEY_RE = re.compile(r"^[0-9a-z_\-]{1,128}$")


class SchemaError(UserError, ValueError):
  """A record does not follow the schema; the message names the record and every field."""


# ----------------------------------------------------------------------------- keys
def make_key(source: str, item_id: str) -> str:
  """Stable record key: 20 hex chars of sha1(source NUL item_id)."""
  digest = hashlib.sha1(f"{source}\x00{item_id}".encode("utf-8")).hexdigest()
  return digest[:20]


def shard_of(key: str, num_shards: int) -> int:
  """Deterministic shard index of a key (uniform over `num_shards`)."""
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:12], 16) % num_shards


def shard_filename(name: str, split: str, index: int, num_shards: int) -> str:
  """TFDS-style ArrayRecord shard name: `{name}-{split}.array_record-00003-of-00008`."""
  return f"{name}-{split}.array_record-{index:05d}-of-{num_shards:05d}"


# ------------------------------------------------------------------ tf.train.Example codec
def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  shift = result = 0
  while True:
    if pos >= len(buf):
      raise SchemaError("truncated protobuf varint")
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise SchemaError("protobuf varint too long")


def _ld(field: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field."""
  return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _fields(buf: bytes) -> Iterable[tuple[int, int, Any]]:
  """Yield (field number, wire type, value) of a protobuf message."""
  pos = 0
  while pos < len(buf):
    tag, pos = _read_varint(buf, pos)
    field, wire = tag >> 3, tag & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 2:
      n, pos = _read_varint(buf, pos)
      if pos + n > len(buf):
        raise SchemaError("truncated protobuf field")
      value, pos = buf[pos:pos + n], pos + n
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      raise SchemaError(f"unsupported protobuf wire type {wire}")
    yield field, wire, value


def encode_example(features: dict[str, list[bytes] | list[int] | list[float]]) -> bytes:
  """Serialize a `tf.train.Example` whose features are bytes, int64 or float lists."""
  entries = []
  for name in sorted(features):
    values = list(features[name])
    if all(isinstance(v, (bytes, bytearray)) for v in values):
      inner = _ld(1, b"".join(_ld(1, bytes(v)) for v in values))  # Feature.bytes_list
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
      packed = b"".join(_varint(v & 0xFFFFFFFFFFFFFFFF) for v in values)
      inner = _ld(3, _ld(1, packed))  # Feature.int64_list, packed
    elif all(isinstance(v, float) for v in values):
      inner = _ld(2, _ld(1, struct.pack(f"<{len(values)}f", *values)))
    else:
      raise SchemaError(f"feature {name!r}: values must be all bytes, all int or all float")
    entries.append(_ld(1, _ld(1, name.encode("utf-8")) + _ld(2, inner)))  # map entry
  return _ld(1, b"".join(entries))  # Example.features


def decode_example(buf: bytes) -> dict[str, list]:
  """Parse a serialized `tf.train.Example` into {name: list of bytes | int | float}."""
  out: dict[str, list] = {}
  for f, _, features in _fields(buf):
    if f != 1:
      continue
    for g, _, entry in _fields(features):
      if g != 1:
        continue
      name, values = None, []
      for h, _, v in _fields(entry):
        if h == 1:
          name = v.decode("utf-8")
        elif h == 2:
          values = _decode_feature(v)
      if name is None:
        raise SchemaError("tf.train.Example map entry without a key")
      out[name] = values
  return out


def _decode_feature(buf: bytes) -> list:
  for kind, _, lst in _fields(buf):
    values: list = []
    for i, wire, v in _fields(lst):
      if i != 1:
        continue
      if kind == 1:
        values.append(bytes(v))
      elif kind == 2:
        values.extend(struct.unpack(f"<{len(v) // 4}f", v) if wire == 2 else struct.unpack("<f", v))
      elif kind == 3:
        if wire == 2:
          pos = 0
          while pos < len(v):
            n, pos = _read_varint(v, pos)
            values.append(n - (1 << 64) if n >= 1 << 63 else n)
        else:
          values.append(v - (1 << 64) if v >= 1 << 63 else v)
    return values
  return []


# ----------------------------------------------------------------------------- records
def encode(record: dict[str, Any], *, check: bool = True) -> bytes:
  """Record dict -> serialized tf.train.Example bytes (validated first unless check=False)."""
  if check:
    validate(record)
  meta = {k: v for k, v in record.items() if k != "image"}
  meta_json = json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
  return encode_example({
      "key": [record["key"].encode("utf-8")],
      "image": [bytes(record["image"])],
      "meta_json": [meta_json.encode("utf-8")],
  })


def decode(buf: bytes, *, check: bool = False) -> dict[str, Any]:
  """Serialized record -> record dict (the inverse of `encode`)."""
  feats = decode_example(buf)
  missing = [k for k in FEATURE_KEYS if len(feats.get(k, [])) != 1]
  if missing:
    raise SchemaError(f"record: features {missing} missing or not scalar")
  record = json.loads(feats["meta_json"][0].decode("utf-8"))
  record["image"] = feats["image"][0]
  key = feats["key"][0].decode("utf-8")
  if record.get("key") != key:
    raise SchemaError(f"record {key}: key feature and meta_json key {record.get('key')!r} differ")
  version = record.get("schema_version")
  if not isinstance(version, int) or version > SCHEMA_VERSION:
    raise SchemaError(f"record {key}: schema_version {version!r} is not readable by version "
                      f"{SCHEMA_VERSION} of this reader")
  if check:
    validate(record)
  return record


def _is_num(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate(record: dict[str, Any]) -> None:
  """Raise `SchemaError` listing every problem of `record` (record key + field path)."""
  errs: list[str] = []
  key = record.get("key", "<no key>")

  def need(field, types, path=None):
    value = record.get(field)
    if not isinstance(value, types) or isinstance(value, bool):
      errs.append(f"{path or field}: expected {getattr(types, '__name__', types)}, "
                  f"got {type(value).__name__}")
      return False
    return True

  if record.get("schema_version") != SCHEMA_VERSION:
    errs.append(f"schema_version: expected {SCHEMA_VERSION}, got {record.get('schema_version')!r}")
  if need("key", str) and not _KEY_RE.match(record["key"]):
    errs.append(f"key: {record['key']!r} is not 1..128 chars of [0-9a-z_-]")
  need("source", str)
  need("item_id", str)
  if need("image", (bytes, bytearray)) and not record["image"]:
    errs.append("image: empty")
  need("image_format", str)
  w_ok = need("width", int) and record["width"] >= 1
  h_ok = need("height", int) and record["height"] >= 1
  if not (w_ok and h_ok):
    errs.append("width/height: must be ints >= 1")
  need("caption", str)
  prov = record.get("caption_provenance")
  if not (isinstance(prov, dict) and isinstance(prov.get("backend"), str)
          and isinstance(prov.get("version"), str)):
    errs.append("caption_provenance: expected {'backend': str, 'version': str}")
  need("extra", dict)

  regions = record.get("regions")
  ids: set[int] = set()
  if not isinstance(regions, list):
    errs.append("regions: expected list")
    regions = []
  width, height = record.get("width", 0), record.get("height", 0)
  for i, r in enumerate(regions):
    p = f"regions[{i}]"
    if not isinstance(r, dict):
      errs.append(f"{p}: expected dict")
      continue
    rid = r.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool) or rid in ids:
      errs.append(f"{p}.id: expected a unique int, got {rid!r}")
    else:
      ids.add(rid)
    box = r.get("box")
    if not (isinstance(box, list) and len(box) == 4 and all(_is_num(v) for v in box)):
      errs.append(f"{p}.box: expected 4 finite numbers, got {box!r}")
    else:
      x1, y1, x2, y2 = box
      if not (x1 < x2 and y1 < y2):
        errs.append(f"{p}.box: {box} needs x1 < x2 and y1 < y2")
      elif w_ok and h_ok and not (0 <= x1 and x2 <= width and 0 <= y1 and y2 <= height):
        errs.append(f"{p}.box: {box} not inside the {width}x{height} image")
    for f in ("category", "phrase", "description", "referring"):
      if not isinstance(r.get(f), str) or not r.get(f).strip():
        errs.append(f"{p}.{f}: expected a non-empty str, got {r.get(f)!r}")
    for f in ("score", "verify_score"):
      if not (_is_num(r.get(f)) and 0.0 <= r[f] <= 1.0):
        errs.append(f"{p}.{f}: expected a number in [0, 1], got {r.get(f)!r}")
    if r.get("granularity") not in GRANULARITIES:
      errs.append(f"{p}.granularity: expected one of {GRANULARITIES}, got {r.get('granularity')!r}")
    pv = r.get("provenance")
    if not (isinstance(pv, dict) and all(isinstance(v, str) for v in pv.values())):
      errs.append(f"{p}.provenance: expected dict[str, str]")

  proposals = record.get("proposals")
  if proposals is not None:
    if not isinstance(proposals, dict):
      errs.append("proposals: expected dict or None")
    else:
      b, s = proposals.get("boxes"), proposals.get("scores")
      if not (isinstance(b, list) and isinstance(s, list) and len(b) == len(s)
              and all(isinstance(x, list) and len(x) == 4 and all(_is_num(v) for v in x) for x in b)
              and all(_is_num(v) for v in s)):
        errs.append("proposals: expected boxes [[4 numbers]...] and scores [numbers] of equal length")

  convs = record.get("conversations")
  if not isinstance(convs, list):
    errs.append("conversations: expected list")
    convs = []
  for t, turn in enumerate(convs):
    p = f"conversations[{t}]"
    if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("text"), str):
      errs.append(f"{p}: expected {{'role': one of {ROLES}, 'text': str, 'groundings': list}}")
      continue
    text = turn["text"]
    for g, gr in enumerate(turn.get("groundings", [])):
      q = f"{p}.groundings[{g}]"
      s, e, rids = (gr.get("start"), gr.get("end"), gr.get("region_ids")) if isinstance(gr, dict) else (None,) * 3
      if not (isinstance(s, int) and isinstance(e, int) and 0 <= s < e <= len(text)):
        errs.append(f"{q}: span [{s}, {e}) not inside the {len(text)}-char text")
      if not (isinstance(rids, list) and rids and all(x in ids for x in rids)):
        errs.append(f"{q}.region_ids: {rids!r} must be a non-empty list of existing region ids")
  if errs:
    raise SchemaError(f"record {key}: " + "; ".join(errs))


def region_arrays(record: dict[str, Any]):
  """Regions as numpy arrays: boxes [R, 4] float32 (xyxy pixels), scores [R] float32,
  fine [R] bool. Imported lazily so the rest of the module stays numpy-free."""
  import numpy as np
  regions = record["regions"]
  boxes = np.asarray([r["box"] for r in regions], np.float32).reshape(-1, 4)
  scores = np.asarray([r["score"] for r in regions], np.float32)
  fine = np.asarray([r["granularity"] == "fine" for r in regions], bool)
  return boxes, scores, fine
