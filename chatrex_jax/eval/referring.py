"""Referring accuracy (RefCOCO / RefCOCO+ / RefCOCOg protocol) and RefCOCO-family readers.

Protocol: every referring *sentence* is one test sample with one GT box (the referred COCO
annotation). The prediction is the model's top-1 box (for ChatRex: the first box of the first
grounded phrase); a sample is correct when IoU(top-1, GT) >= 0.5. No box (failure / rejection)
is wrong. accuracy = correct / samples.

Readers:
* `load_refs(path)`: the `refs(unc).p` / `refs(umd).p` / `refs(google).p` pickles of the
  `refer` toolkit, read with `SafeUnpickler`, a `pickle.Unpickler` whose `find_class` only
  resolves the few builtins that plain data needs (set, frozenset, ...) and raises
  `UnsafePickleError` for anything else (os.system, subprocess, eval, ...). Plain dict / list /
  str / int / float / tuple data never calls find_class, so it loads normally. These pickles
  were written by Python 2: byte strings are decoded with `encoding` (default "utf-8", with
  "latin1" as a fallback for invalid bytes).
* `refcoco_samples(refs, instances, split)`: joins refs with the COCO instances JSON
  (`instances.json` of the same refer dataset) into per-sentence samples with xyxy GT boxes.
* `load_tfds_refcoco(...)`: TFDS `ref_coco` when tensorflow_datasets is installed (optional).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from chatrex_jax.eval.recall import iou_matrix

# (module, name) pairs that plain-data pickles may reference. Python 2 pickles name the module
# "__builtin__"; `copy_reg._reconstructor` is deliberately NOT allowed (it can call any class).
_ALLOWED_GLOBALS = {
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"),
    ("builtins", "bytearray"), ("builtins", "slice"), ("builtins", "range"),
    ("__builtin__", "set"), ("__builtin__", "frozenset"), ("__builtin__", "complex"),
    ("__builtin__", "bytearray"), ("__builtin__", "slice"), ("__builtin__", "xrange"),
    ("__builtin__", "unicode"), ("__builtin__", "long"),
    # Python 3 `bytes` pickled with protocol < 3 is `_codecs.encode(text, "latin1")`; resolved
    # to `_latin1_encode`, which accepts that codec only.
    ("_codecs", "encode"),
}


def _latin1_encode(text, encoding="utf-8", errors="strict"):
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "iso-8859-1"):
    raise UnsafePickleError(f"_codecs.encode is only allowed with a str and the latin1 codec "
                            f"(got {type(text).__name__}, {encoding!r})")
  return text.encode("latin1", errors)
_PY2_RENAMES = {"unicode": "str", "long": "int", "xrange": "range"}


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle references a global that plain data does not need; nothing was executed."""


class SafeUnpickler(pickle.Unpickler):
  """Unpickler that resolves only `_ALLOWED_GLOBALS` (plain-data builtins).

  Any other global (the way a pickle reaches os.system, subprocess.Popen, builtins.eval,
  numpy reconstructors, ...) raises UnsafePickleError before anything is called. Persistent
  ids are refused as well.
  """

  def find_class(self, module: str, name: str):
    if (module, name) not in _ALLOWED_GLOBALS:
      raise UnsafePickleError(
          f"refusing to load global {module}.{name}: this pickle is not plain data (only "
          "dict/list/tuple/str/bytes/int/float/bool/None and set/frozenset are allowed); it "
          "may execute code when unpickled with pickle.load")
    if (module, name) == ("_codecs", "encode"):
      return _latin1_encode
    import builtins
    return getattr(builtins, _PY2_RENAMES.get(name, name))

  def persistent_load(self, pid):
    raise UnsafePickleError(f"refusing persistent id {pid!r} in a plain-data pickle")


def safe_loads(data: bytes, *, encoding: str = "utf-8") -> Any:
  """Restricted unpickling of bytes (see SafeUnpickler). Python 2 byte strings are decoded
  with `encoding`; if that fails, "latin1" is tried."""
  try:
    return SafeUnpickler(io.BytesIO(data), encoding=encoding).load()
  except UnicodeDecodeError:
    if encoding == "latin1":
      raise
    return SafeUnpickler(io.BytesIO(data), encoding="latin1").load()


def safe_load(path, *, encoding: str = "utf-8") -> Any:
  """Restricted unpickling of a file (never `pickle.load`)."""
  with open(os.fspath(path), "rb") as f:
    return safe_loads(f.read(), encoding=encoding)


def load_refs(path) -> list[dict]:
  """`refs(*).p` -> list of ref dicts (ref_id, ann_id, image_id, category_id, split,
  sentences [{sent, tokens, sent_id, ...}], ...). Validates the plain-data shape."""
  refs = safe_load(path)
  if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
    raise ValueError(f"{path}: expected a list of dicts (refer toolkit refs), got {type(refs).__name__}")
  for r in refs[:1]:
    missing = [k for k in ("ann_id", "image_id", "split", "sentences") if k not in r]
    if missing:
      raise ValueError(f"{path}: refs lack {missing}")
  return refs


@dataclasses.dataclass
class RefSample:
  """One referring sentence. gt_box: xyxy in original pixels (COCO bbox converted)."""
  sample_id: str
  ref_id: int
  ann_id: int
  image_id: int
  file_name: str
  sentence: str
  gt_box: list[float]
  category_id: int
  split: str

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def refcoco_samples(refs: Sequence[Mapping], instances: Mapping | str | os.PathLike,
                    split: str | None = None) -> list[RefSample]:
  """Per-sentence samples of a split ("val", "testA", "testB", "test", "train"; None = all).
  instances: the refer dataset's `instances.json` (dict or path)."""
  if not isinstance(instances, Mapping):
    with open(os.fspath(instances), encoding="utf-8") as f:
      instances = json.load(f)
  anns = {a["id"]: a for a in instances["annotations"]}
  imgs = {i["id"]: i for i in instances["images"]}
  out = []
  for r in refs:
    if split is not None and r["split"] != split:
      continue
    ann = anns.get(r["ann_id"])
    if ann is None:
      raise ValueError(f"ref {r.get('ref_id')} refers to annotation {r['ann_id']} missing from "
                       "instances")
    x, y, w, h = ann["bbox"]
    img = imgs.get(r["image_id"], {})
    for k, s in enumerate(r["sentences"]):
      sent = s["sent"] if isinstance(s, Mapping) else str(s)
      sid = s.get("sent_id", k) if isinstance(s, Mapping) else k
      out.append(RefSample(f"{r.get('ref_id')}_{sid}", int(r.get("ref_id", -1)), int(r["ann_id"]),
                           int(r["image_id"]), img.get("file_name", r.get("file_name", "")), sent,
                           [float(x), float(y), float(x + w), float(y + h)],
                           int(r.get("category_id", ann.get("category_id", -1))), r["split"]))
  return out


def load_tfds_refcoco(name: str = "ref_coco/refcoco_unc", split: str = "validation",
                      data_dir: str | None = None) -> list[dict]:
  """Per-sentence samples from TFDS `ref_coco` (optional dependency tensorflow_datasets).

  Returns dicts {sample_id, image (uint8 HWC), sentence, gt_box (xyxy pixels)}. TFDS stores
  boxes as normalised (ymin, xmin, ymax, xmax); they are converted with the image size.
  Not exercised by the tests here (TFDS is not installed in this environment).
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("load_tfds_refcoco needs tensorflow_datasets (pip install "
                      "tensorflow-datasets); or use load_refs + refcoco_samples on the refer "
                      "toolkit files") from e
  ds = tfds.load(name, split=split, data_dir=data_dir)
  out = []
  for ex in tfds.as_numpy(ds):
    image = ex["image"]
    h, w = image.shape[:2]
    objs = ex["objects"]
    for k in range(len(objs["id"])):
      ymin, xmin, ymax, xmax = (float(v) for v in objs["bbox"][k])
      box = [xmin * w, ymin * h, xmax * w, ymax * h]
      raws = objs["refexp"]["raw"][k]
      ids = objs["refexp"]["refexp_id"][k]
      for rid, raw in zip(ids, raws):
        out.append({"sample_id": str(int(rid)), "image": image,
                    "sentence": raw.decode("utf-8") if isinstance(raw, bytes) else str(raw),
                    "gt_box": box})
  return out


def top1_box(extracted_predictions) -> list[float] | None:
  """The first predicted box of an official `extracted_predictions` list ([[]] / [] -> None)."""
  if not extracted_predictions or len(extracted_predictions[0]) != 4:
    return None
  return [float(v) for v in extracted_predictions[0]]


@dataclasses.dataclass
class ReferringResult:
  accuracy: float
  correct: int
  total: int
  hits: list[bool]
  ious: list[float]

  def to_dict(self) -> dict:
    return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total}


def referring_accuracy(pred_boxes: Sequence, gt_boxes: Sequence, iou_threshold: float = 0.5
                       ) -> ReferringResult:
  """pred_boxes: per sample the top-1 xyxy box or None; gt_boxes: per sample one xyxy box, or a
  list of acceptable xyxy boxes (correct when any has IoU >= threshold)."""
  if len(pred_boxes) != len(gt_boxes):
    raise ValueError(f"{len(pred_boxes)} predictions but {len(gt_boxes)} GT entries")
  hits, ious = [], []
  for p, g in zip(pred_boxes, gt_boxes):
    g = np.asarray(g, np.float64)
    g = g.reshape(-1, 4) if g.size else np.zeros((0, 4))
    if p is None or len(p) == 0 or g.shape[0] == 0:
      hits.append(False)
      ious.append(0.0)
      continue
    iou = float(iou_matrix(np.asarray(p, np.float64).reshape(1, 4), g).max())
    ious.append(iou)
    hits.append(iou >= iou_threshold)
  n = len(hits)
  return ReferringResult(sum(hits) / n if n else 0.0, int(sum(hits)), n, hits, ious)


def accuracy_from_records(gt_data: Sequence[Mapping], pred_data: Iterable[Mapping],
                          iou_threshold: float = 0.5, skip_domains: Sequence[str] = ("rejection",)
                          ) -> ReferringResult:
  """Referring accuracy on RexSeek-style records: GT `answer_boxes` (any of them accepted),
  prediction = top-1 of `extracted_predictions`; samples in skip_domains are left out."""
  lookup = {p["id"]: p.get("extracted_predictions", []) for p in pred_data}
  preds, gts = [], []
  for g in gt_data:
    if g.get("domain") in skip_domains or not g.get("answer_boxes"):
      continue
    preds.append(top1_box(lookup.get(g["id"], [])))
    gts.append(g["answer_boxes"])
  return referring_accuracy(preds, gts, iou_threshold)
