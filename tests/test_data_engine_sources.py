"""Stage 1a: image sources list stable references and load the bytes lazily."""
import base64
import hashlib
import json

import pytest

from chatrex_jax.data import schema
from data_engine import sources, synthetic


def _png(i: int) -> bytes:
  return synthetic.render_png(synthetic.make_scene(4, i, 64))


def test_folder_files_and_bytes(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "a.png").write_bytes(_png(0))
  (tmp_path / "sub" / "b.PNG").write_bytes(_png(1))
  (tmp_path / "notes.txt").write_text("not an image")
  refs = list(sources.list_items({"kind": "folder", "name": "f", "path": str(tmp_path)}))
  assert [r["item_id"] for r in refs] == ["a.png", "sub/b.PNG"]
  assert refs[0]["key"] == schema.make_key("f", "a.png")
  assert sources.load_bytes(refs[1])[0] == _png(1)
  flat = list(sources.list_items({"kind": "folder", "name": "f", "path": str(tmp_path),
                                  "recursive": False}))
  assert [r["item_id"] for r in flat] == ["a.png"]
  files = list(sources.list_items({"kind": "files", "paths": [str(tmp_path / "a.png")]}))
  assert sources.load_bytes(files[0])[0] == _png(0)
  inline = list(sources.list_items({"kind": "bytes", "name": "web", "items": [
      {"id": "https://x/y.png", "bytes": _png(2), "nsfw": True}, {"bytes": _png(3)}]}))
  assert inline[0]["item_id"] == "https://x/y.png" and inline[0]["meta"] == {"nsfw": True}
  assert inline[1]["item_id"] == hashlib.sha1(_png(3)).hexdigest()
  assert sources.load_bytes(inline[1])[0] == _png(3)
  with pytest.raises(FileNotFoundError):
    list(sources.list_items({"kind": "folder", "path": str(tmp_path / "missing")}))
  with pytest.raises(ValueError, match="unknown kind"):
    list(sources.list_items({"kind": "s3"}))


def test_jsonl_manifest(tmp_path):
  (tmp_path / "img.png").write_bytes(_png(0))
  rows = [{"id": "one", "path": "img.png", "caption": "A dot.", "nsfw": False},
          {"id": "two", "image_b64": base64.b64encode(_png(1)).decode()},
          {"id": "three"}]
  (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
  refs = list(sources.list_items({"kind": "jsonl", "name": "m", "path": str(tmp_path / "m.jsonl")}))
  assert [r["item_id"] for r in refs] == ["one", "two", "three"]
  assert refs[0]["meta"] == {"caption": "A dot.", "nsfw": False}
  assert sources.load_bytes(refs[0])[0] == _png(0)
  assert sources.load_bytes(refs[1])[0] == _png(1)
  with pytest.raises(ValueError, match="no 'path'"):
    sources.load_bytes(refs[2])


def test_parquet_manifest(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  table = pa.table({"id": ["p0", "p1"], "image": [_png(0), _png(1)], "nsfw": [False, True]})
  pq.write_table(table, tmp_path / "m.parquet")
  refs = list(sources.list_items({"kind": "parquet", "name": "pq", "path": str(tmp_path / "m.parquet")}))
  assert [(r["item_id"], r["meta"]) for r in refs] == [("p0", {"nsfw": False}), ("p1", {"nsfw": True})]
  assert [sources.load_bytes(r)[0] for r in refs] == [_png(0), _png(1)]
  # Hugging Face `datasets` layout: image = struct{bytes, path}; paths relative to the file
  (tmp_path / "x.png").write_bytes(_png(2))
  hf = pa.table({"image": [{"bytes": _png(3), "path": "y.png"}]})
  pq.write_table(hf, tmp_path / "hf.parquet")
  (ref,) = sources.list_items({"kind": "parquet", "path": str(tmp_path / "hf.parquet")})
  assert ref["item_id"] == "row0" and sources.load_bytes(ref)[0] == _png(3)
  pq.write_table(pa.table({"path": ["x.png"]}), tmp_path / "paths.parquet")
  (ref,) = sources.list_items({"kind": "parquet", "path": str(tmp_path / "paths.parquet")})
  assert sources.load_bytes(ref)[0] == _png(2)


def test_synthetic_source_is_labelled_and_deterministic():
  spec = {"kind": "synthetic", "seed": 2, "num_images": 3, "image_size": 64}
  a, b = list(sources.list_items(spec)), list(sources.list_items(spec))
  assert a == b and [r["meta"] for r in a] == [{"synthetic": True}] * 3
  data, extra = sources.load_bytes(a[1])
  assert extra["scene"] == synthetic.make_scene(2, 1, 64)
  assert data == synthetic.render_png(extra["scene"])
