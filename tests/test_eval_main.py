"""`chatrex-jax eval`: metric subcommands on hand files, and a tiny-model end-to-end run."""
import json

import jax
import numpy as np
from PIL import Image
import pytest

from chatrex_jax import cli
from chatrex_jax.eval import main as eval_main
from tests.builders import write_tiny_checkpoint

A = [0, 0, 10, 10]


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _ann(i, domain, sub, answer, cands, image="img.png", referring="the person"):
  return {"id": i, "image_name": image, "referring": referring, "candidate_boxes": cands,
          "answer_boxes": answer, "domain": domain, "sub_domain": sub}


def test_rexseek_subcommand(tmp_path):
  gt = [_ann(1, "attr", "color", [A], [A, [20, 0, 30, 10]]),
        _ann(2, "attr", "shape", [A, [20, 0, 30, 10]], [A, [20, 0, 30, 10]]),
        _ann(3, "rejection", "rej", [], [A])]
  preds = [{"id": 1, "extracted_predictions": [A]}, {"id": 2, "extracted_predictions": [A]},
           {"id": 3, "extracted_predictions": [[]]}]
  g = _write_jsonl(tmp_path / "gt.jsonl", gt)
  p = _write_jsonl(tmp_path / "model.jsonl", preds)
  assert cli.main(["eval", "rexseek", "--annotations", str(g), "--predictions", str(p),
                   "--out", str(tmp_path / "out")]) == 0
  js = json.loads((tmp_path / "out" / "metrics.json").read_text())
  avg = js["summary"]["model"]["average"]
  assert avg["recall_50"] == pytest.approx((1 + 0.5) / 2) and avg["count"] == 2
  assert js["rejection"]["model"] == {"rejection_score": 1, "rejection_total": 1}
  assert js["referring_accuracy"]["model"]["accuracy"] == 1.0
  md = (tmp_path / "out" / "metrics.md").read_text()
  assert "DensityF1@0.5:0.95" in md and "| Average | All Data | model |" in md


def test_coco_and_recall_subcommands(tmp_path):
  gt = {"images": [{"id": 1, "width": 50, "height": 50}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10],
                         "area": 100, "iscrowd": 0},
                        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 30, 10, 10],
                         "area": 100, "iscrowd": 0}]}
  (tmp_path / "gt.json").write_text(json.dumps(gt))
  res = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}]
  (tmp_path / "res.json").write_text(json.dumps(res))
  assert eval_main.main(["coco", "--annotations", str(tmp_path / "gt.json"), "--predictions",
                         str(tmp_path / "res.json"), "--out", str(tmp_path / "c")]) == 0
  stats = json.loads((tmp_path / "c" / "metrics.json").read_text())
  assert stats["AP50"] == pytest.approx(51 / 101) and stats["AR100"] == pytest.approx(0.5)
  assert eval_main.main(["proposal-recall", "--annotations", str(tmp_path / "gt.json"),
                         "--predictions", str(tmp_path / "res.json"), "--out",
                         str(tmp_path / "r")]) == 0
  r = json.loads((tmp_path / "r" / "metrics.json").read_text())
  assert r["proposal_recall"]["recall"] == 0.5 and r["proposal_recall"]["total"] == 2
  # A bad file gives a clear error and exit code 2.
  (tmp_path / "bad.jsonl").write_text("{not json}\n")
  assert eval_main.main(["rexseek", "--annotations", str(tmp_path / "bad.jsonl"),
                         "--predictions", str(tmp_path / "bad.jsonl"), "--out",
                         str(tmp_path / "x")]) == 2


def test_refcoco_subcommand(tmp_path):
  import pickle
  refs = [{"ref_id": 5, "ann_id": 70, "image_id": 3, "split": "testA",
           "sentences": [{"sent": "left man", "sent_id": 1}, {"sent": "red guy", "sent_id": 2}]}]
  (tmp_path / "refs.p").write_bytes(pickle.dumps(refs, protocol=2))
  (tmp_path / "inst.json").write_text(json.dumps(
      {"images": [{"id": 3, "file_name": "x.jpg"}],
       "annotations": [{"id": 70, "bbox": [0, 0, 10, 10], "category_id": 1}]}))
  _write_jsonl(tmp_path / "p.jsonl", [{"id": "5_1", "extracted_predictions": [A]},
                                      {"id": "5_2", "extracted_predictions": [[]]}])
  args = ["refcoco", "--refs", str(tmp_path / "refs.p"), "--instances", str(tmp_path / "inst.json"),
          "--split", "testA", "--predictions", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o")]
  assert eval_main.main(args) == 0
  js = json.loads((tmp_path / "o" / "metrics.json").read_text())
  assert (js["accuracy"], js["correct"], js["total"]) == (0.5, 1, 2)
  # A malicious refs file is refused with exit code 2 (nothing executed).
  (tmp_path / "refs.p").write_bytes(b"cos\nsystem\n(S'true'\ntR.")
  assert eval_main.main(args) == 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_end_to_end_run_on_tiny_model(tmp_path, checkpoint, capsys):
  rng = np.random.default_rng(0)
  img_dir = tmp_path / "images"
  img_dir.mkdir()
  sizes = [(64, 48), (40, 56), (50, 50)]
  for k, (w, h) in enumerate(sizes):
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img_dir / f"{k}.png")
  anns = [_ann("a", "attr", "color", [[1, 1, 20, 20]], [[1, 1, 20, 20], [5, 5, 40, 30]], "0.png"),
          _ann("b", "position", "inner", [[0, 0, 10, 10], [10, 10, 30, 40]],
               [[0, 0, 10, 10], [10, 10, 30, 40], [2, 3, 8, 9]], "1.png", "the two people"),
          _ann("c", "rejection", "rej", [], [[3, 3, 30, 30]], "2.png", "a unicorn")]
  ann_path = _write_jsonl(tmp_path / "ann.jsonl", anns)
  out = tmp_path / "out"
  # batch size 2 over 3 samples: the last batch is padded to the same static shape.
  assert cli.main(["eval", "--checkpoint", str(checkpoint), "--annotations", str(ann_path),
                   "--image-dir", str(img_dir), "--out", str(out), "--batch-size", "2",
                   "--max-new-tokens", "6", "--no-progress"]) == 0
  if jax.device_count() > 1:  # conftest's fake CPU devices: the batch is split over 2
    assert "batches split over 2 devices" in capsys.readouterr().out
  lines = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
  assert [l["id"] for l in lines] == ["a", "b", "c"]
  for l, a in zip(lines, anns):
    assert set(l) == {"id", "question", "raw_response", "extracted_predictions", "answer_id",
                      "candidate_boxes"}
    assert l["question"] == (f"Please detect {a['referring']} in this image. Answer the "
                             "question with object indexes.")
    assert isinstance(l["raw_response"], str) and len(l["answer_id"]) == 22
    assert l["candidate_boxes"] == [[float(v) for v in b] for b in a["candidate_boxes"]]
    ep = l["extracted_predictions"]
    assert isinstance(ep, list) and (ep == [[]] or all(len(b) == 4 for b in ep))
  js = json.loads((out / "metrics.json").read_text())
  avg = js["summary"]["ChatRex-JAX"]["average"]
  assert avg["count"] == 2 and 0.0 <= avg["density_f1_mean"] <= 1.0
  assert js["rejection"]["ChatRex-JAX"]["rejection_total"] == 1
  assert (out / "metrics.md").read_text().startswith("# Evaluation Results")
