"""Stage 1a: image collection.

A source lists lightweight item references (the driver lists them; the pixels are read by
the workers). A reference is a plain dict:

    {"key": str, "source": str, "item_id": str, "load": {...how to get the bytes...},
     "meta": {...manifest fields: nsfw flag, caption, conversations...}}

`key = schema.make_key(source_name, item_id)` is stable, so a rerun finds the same keys.

Source kinds (config `sources = [{"kind": ..., "name": ..., ...}]`):
* `folder`: {"path", "recursive": True, "extensions": [...]}; item id = relative path.
* `files`: {"paths": [...]} explicit file paths; item id = the path as given.
* `bytes`: {"items": [{"id"?, "bytes" | "b64", ...meta}]}; item id = "id" or the sha1 of
  the bytes (e.g. URLs already fetched elsewhere: {"id": url, "bytes": ...}).
* `jsonl`: {"path", "id_field": "id", "path_field": "path", "b64_field": "image_b64"};
  one JSON object per line with a relative/absolute image path or base64 bytes, plus meta.
* `parquet`: {"path", "id_field": "id", "path_field": "path", "bytes_field": "image"};
  bytes columns are read lazily by row on the worker.
* `synthetic`: {"seed", "num_images", "image_size", "min_objects", "max_objects",
  "part_prob"} -- SYNTHETIC SCENES for tests and the demo (data_engine/synthetic.py).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from typing import Any, Iterator

from chatrex_jax.configs import ConfigError
from chatrex_jax.data import schema

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _ref(source: str, item_id: str, load: dict, meta: dict | None = None) -> dict[str, Any]:
  return {"key": schema.make_key(source, item_id), "source": source, "item_id": item_id,
          "load": load, "meta": dict(meta or {})}


def list_items(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
  """Item references of one source spec (see the module docstring)."""
  spec = dict(spec)
  kind = spec.get("kind")
  name = spec.get("name") or kind
  if kind == "folder":
    root = spec["path"]
    if not os.path.isdir(root):
      raise FileNotFoundError(f"source {name!r}: folder {root} does not exist")
    exts = tuple(e.lower() for e in spec.get("extensions", IMAGE_EXTENSIONS))
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      if not spec.get("recursive", True) and dirpath != root:
        continue
      paths += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(exts)]
    for p in sorted(paths):
      yield _ref(name, os.path.relpath(p, root), {"kind": "file", "path": os.path.abspath(p)})
  elif kind == "files":
    for p in spec["paths"]:
      yield _ref(name, str(p), {"kind": "file", "path": os.path.abspath(p)})
  elif kind == "bytes":
    for item in spec["items"]:
      item = dict(item)
      data = item.pop("bytes", None)
      if data is None:
        data = base64.b64decode(item.pop("b64"))
      item_id = str(item.pop("id", None) or hashlib.sha1(data).hexdigest())
      yield _ref(name, item_id, {"kind": "inline", "b64": base64.b64encode(data).decode()}, item)
  elif kind == "jsonl":
    base = os.path.dirname(os.path.abspath(spec["path"]))
    id_f, path_f, b64_f = (spec.get("id_field", "id"), spec.get("path_field", "path"),
                           spec.get("b64_field", "image_b64"))
    with open(spec["path"]) as f:
      for line_no, line in enumerate(f):
        if not line.strip():
          continue
        row = json.loads(line)
        item_id = str(row.pop(id_f, None) or row.get(path_f) or f"line{line_no}")
        if b64_f in row:
          load = {"kind": "inline", "b64": row.pop(b64_f)}
        elif path_f in row:
          load = {"kind": "file", "path": os.path.join(base, row.pop(path_f))}
        else:
          load = {"kind": "missing", "detail": f"line {line_no}: no {path_f!r} or {b64_f!r}"}
        yield _ref(name, item_id, load, row)
  elif kind == "parquet":
    import pyarrow.parquet as pq
    path = os.path.abspath(spec["path"])
    id_f, path_f, bytes_f = (spec.get("id_field", "id"), spec.get("path_field", "path"),
                             spec.get("bytes_field", "image"))
    table = pq.read_table(path)
    meta_cols = [c for c in table.column_names if c not in (bytes_f,)]
    rows = table.select(meta_cols).to_pylist()
    has_bytes = bytes_f in table.column_names
    for i, row in enumerate(rows):
      item_id = str(row.pop(id_f, None) or row.get(path_f) or f"row{i}")
      if has_bytes:
        load = {"kind": "parquet", "path": path, "row": i, "column": bytes_f}
      elif path_f in row:
        load = {"kind": "file", "path": os.path.join(os.path.dirname(path), row.pop(path_f))}
      else:
        load = {"kind": "missing", "detail": f"row {i}: no {bytes_f!r} or {path_f!r}"}
      yield _ref(name, item_id, load, {k: v for k, v in row.items() if _jsonable(v)})
  elif kind == "synthetic":
    seed = int(spec.get("seed", 0))
    params = {k: spec[k] for k in ("image_size", "min_objects", "max_objects", "part_prob")
              if k in spec}
    for i in range(int(spec["num_images"])):
      yield _ref(name, f"{seed}/{i}", {"kind": "synthetic", "seed": seed, "index": i,
                                       "params": params}, {"synthetic": True})
  else:
    raise ConfigError(f"source {name!r}: unknown kind {kind!r} (folder, files, bytes, jsonl, "
                      "parquet, synthetic)")


def _jsonable(v) -> bool:
  try:
    json.dumps(v)
    return True
  except TypeError:
    return False


@functools.lru_cache(maxsize=4)
def _parquet_column(path: str, column: str):
  import pyarrow.parquet as pq
  return pq.read_table(path, columns=[column]).column(column)


def load_bytes(ref: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
  """The encoded image bytes of a reference (+ extra meta, e.g. a synthetic scene).

  Raises OSError/ValueError on unreadable items; the pipeline logs them per item.
  """
  load = ref["load"]
  kind = load["kind"]
  if kind == "file":
    with open(load["path"], "rb") as f:
      return f.read(), {}
  if kind == "inline":
    return base64.b64decode(load["b64"]), {}
  if kind == "parquet":
    value = _parquet_column(load["path"], load["column"])[load["row"]].as_py()
    if isinstance(value, dict):  # HF datasets store {"bytes": ..., "path": ...}
      value = value.get("bytes")
    if not value:
      raise ValueError(f"parquet row {load['row']}: empty {load['column']!r}")
    return bytes(value), {}
  if kind == "synthetic":
    from data_engine import synthetic
    scene = synthetic.make_scene(load["seed"], load["index"], **load.get("params", {}))
    return synthetic.render_png(scene), {"scene": scene}
  if kind == "missing":
    raise ValueError(load["detail"])
  raise ValueError(f"unknown load kind {kind!r}")
