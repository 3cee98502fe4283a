"""Referring accuracy on hand cases; the restricted unpickler; RefCOCO readers."""
import os
import pickle

import pytest

from chatrex_jax.eval import referring as ref


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_refuses_malicious_pickle(tmp_path):
  marker = tmp_path / "pwned"
  data = pickle.dumps({"refs": [_Evil(marker)]})
  with pytest.raises(ref.UnsafePickleError, match=r"refusing to load global (posix|nt|os)\.system"):
    ref.safe_loads(data)
  assert not marker.exists()  # nothing ran
  (tmp_path / "refs(unc).p").write_bytes(data)
  with pytest.raises(pickle.UnpicklingError):  # UnsafePickleError is an UnpicklingError
    ref.load_refs(tmp_path / "refs(unc).p")
  assert not marker.exists()
  for evil in (b"cbuiltins\neval\n(S'1+1'\ntR.", b"csubprocess\nPopen\n(S'true'\ntR.",
               b"ccopy_reg\n_reconstructor\n(c__builtin__\nobject\nNtR.",
               b"c_codecs\nencode\n(S'x'\nS'zlib'\ntR."):
    with pytest.raises(ref.UnsafePickleError):
      ref.safe_loads(evil)


def test_loads_plain_data_all_protocols():
  obj = [{"ref_id": 1, "ann_id": 7, "image_id": 3, "split": "testA", "score": 0.5,
          "sentences": [{"sent": "man on the left", "sent_id": 11, "tokens": ["man", "on"]}],
          "pair": (1, 2), "tags": {"a", "b"}, "none": None, "flag": True, "raw": b"\x00\x01"}]
  for proto in range(0, pickle.HIGHEST_PROTOCOL + 1):
    assert ref.safe_loads(pickle.dumps(obj, protocol=proto)) == obj
  # A Python 2 style pickle (module "__builtin__", str as bytes) loads too.
  py2 = b"(dp0\nS'sent'\np1\nS'caf\\xc3\\xa9'\np2\nsS'ids'\np3\nc__builtin__\nset\np4\n((lp5\nI1\naI2\natp6\nRp7\ns."
  assert ref.safe_loads(py2) == {"sent": "café", "ids": {1, 2}}


def test_refcoco_samples(tmp_path):
  refs = [{"ref_id": 5, "ann_id": 70, "image_id": 3, "category_id": 1, "split": "val",
           "sentences": [{"sent": "left man", "sent_id": 1}, {"sent": "guy in red", "sent_id": 2}]},
          {"ref_id": 6, "ann_id": 71, "image_id": 3, "category_id": 1, "split": "testA",
           "sentences": [{"sent": "right man", "sent_id": 3}]}]
  (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
  inst = {"images": [{"id": 3, "file_name": "COCO_train2014_000000000003.jpg"}],
          "annotations": [{"id": 70, "bbox": [10, 20, 30, 40], "category_id": 1},
                          {"id": 71, "bbox": [0, 0, 5, 5], "category_id": 1}]}
  loaded = ref.load_refs(tmp_path / "refs(unc).p")
  val = ref.refcoco_samples(loaded, inst, "val")
  assert [s.sentence for s in val] == ["left man", "guy in red"]
  assert val[0].gt_box == [10.0, 20.0, 40.0, 60.0]
  assert val[0].file_name.endswith("03.jpg") and val[1].sample_id == "5_2"
  assert len(ref.refcoco_samples(loaded, inst)) == 3
  with pytest.raises(ValueError, match="missing from instances"):
    ref.refcoco_samples(loaded, {"images": [], "annotations": []})


def test_referring_accuracy_hand_cases():
  gt = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]]
  preds = [[0, 0, 10, 10],   # IoU 1 -> hit
           [0, 0, 10, 5],    # IoU 0.5 exactly -> hit (>=)
           [0, 0, 10, 4.9],  # IoU 0.49 -> miss
           None]             # no answer -> miss
  r = ref.referring_accuracy(preds, gt)
  assert r.hits == [True, True, False, False] and r.accuracy == 0.5 and r.total == 4
  assert r.ious[1] == pytest.approx(0.5)
  # Several acceptable GT boxes: any one suffices.
  assert ref.referring_accuracy([[50, 50, 60, 60]], [[[0, 0, 1, 1], [50, 50, 60, 61]]]).accuracy == 1
  with pytest.raises(ValueError):
    ref.referring_accuracy([None], [])


def test_accuracy_from_records_top1():
  gt = [{"id": 1, "domain": "d", "answer_boxes": [[0, 0, 10, 10]]},
        {"id": 2, "domain": "d", "answer_boxes": [[0, 0, 10, 10]]},
        {"id": 3, "domain": "rejection", "answer_boxes": []},
        {"id": 4, "domain": "d", "answer_boxes": [[0, 0, 10, 10]]}]
  preds = [{"id": 1, "extracted_predictions": [[0, 0, 10, 10], [50, 50, 60, 60]]},
           {"id": 2, "extracted_predictions": [[50, 50, 60, 60], [0, 0, 10, 10]]},  # top-1 wrong
           {"id": 4, "extracted_predictions": [[]]}]
  r = ref.accuracy_from_records(gt, preds)
  assert r.hits == [True, False, False] and r.total == 3
  assert ref.top1_box([[]]) is None and ref.top1_box([]) is None
