"""COCO box AP/AR: equal to a direct pycocotools COCOeval run, and hand-computed cases."""
import contextlib
import io
import json

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
import pytest

from chatrex_jax.eval import coco as coco_lib


def _gt():
  rng = np.random.default_rng(0)
  images = [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in (1, 2, 3)]
  cats = [{"id": 1, "name": "person"}, {"id": 2, "name": "traffic_light"}]
  anns, k = [], 1
  for img in (1, 2, 3):
    for _ in range(4):
      w, h = rng.uniform(8, 200, 2)
      x, y = rng.uniform(0, 400), rng.uniform(0, 250)
      anns.append({"id": k, "image_id": img, "category_id": int(rng.integers(1, 3)),
                   "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h),
                   "iscrowd": 0})
      k += 1
  return {"images": images, "annotations": anns, "categories": cats}


def _dets(gt):
  rng = np.random.default_rng(1)
  out = []
  for a in gt["annotations"]:
    x, y, w, h = a["bbox"]
    for _ in range(2):  # a jittered copy and a looser one
      j = rng.normal(0, 0.08, 4) * [w, h, w, h]
      out.append({"image_id": a["image_id"], "category_id": a["category_id"],
                  "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])],
                  "score": float(rng.uniform())})
  for img in (1, 2, 3):  # pure false positives
    out.append({"image_id": img, "category_id": 1, "bbox": [600, 440, 30, 30], "score": 0.95})
  return out


def _reference(gt, dets, tmp_path, use_cats=True):
  p = tmp_path / "gt.json"
  p.write_text(json.dumps(gt))
  with contextlib.redirect_stdout(io.StringIO()):
    cg = COCO(str(p))
    cd = cg.loadRes(dets)
    ev = COCOeval(cg, cd, "bbox")
    ev.params.useCats = int(use_cats)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats


@pytest.mark.parametrize("use_cats", [True, False])
def test_matches_direct_pycocotools(tmp_path, use_cats):
  gt = _gt()
  dets = _dets(gt)
  ref = _reference(gt, dets, tmp_path, use_cats)
  ours = coco_lib.evaluate_boxes(gt, dets, use_cats=use_cats)
  np.testing.assert_array_equal([ours[k] for k in coco_lib.STAT_NAMES], ref)
  assert 0.1 < ours["AP"] < 0.95  # a non-trivial case
  # Same through a file path.
  (tmp_path / "g2.json").write_text(json.dumps(gt))
  assert coco_lib.evaluate_boxes(tmp_path / "g2.json", dets, use_cats=use_cats)["AP"] == ours["AP"]


def _one_image(gt_boxes, cat=1):
  return {"images": [{"id": 1, "width": 100, "height": 100}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": cat, "bbox": b}
                          for i, b in enumerate(gt_boxes)]}


def test_perfect_predictions_give_one():
  gt = _gt()
  dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
           "score": 0.9} for a in gt["annotations"]]
  s = coco_lib.evaluate_boxes(gt, dets)
  for k in ("AP", "AP50", "AP75", "AR10", "AR100"):
    assert s[k] == pytest.approx(1.0), k
  assert s["AR1"] < 1.0  # 4 GT per image, one detection allowed


def test_fp_ranked_above_tp():
  gt = _one_image([[10, 10, 40, 40]])
  dets = [{"image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.9},  # FP
          {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.8}]  # TP
  s = coco_lib.evaluate_boxes(gt, dets)
  # Precision after the TP is 1/2 at recall 1; the interpolated envelope is 0.5 everywhere.
  assert s["AP"] == pytest.approx(0.5)
  assert s["AP50"] == pytest.approx(0.5)
  assert s["AR100"] == pytest.approx(1.0)
  assert s["AR1"] == pytest.approx(0.0)  # only the top-scored (FP) box counts


def test_tp_fp_tp_known_ap():
  gt = _one_image([[10, 10, 20, 20], [50, 50, 30, 30]])
  dets = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
          {"image_id": 1, "category_id": 1, "bbox": [0, 70, 10, 10], "score": 0.8},
          {"image_id": 1, "category_id": 1, "bbox": [50, 50, 30, 30], "score": 0.7}]
  # precisions 1, 1/2, 2/3 at recalls .5, .5, 1 -> envelope 1 for r <= .5 (51 of the 101
  # recall points), 2/3 above (50 points).
  s = coco_lib.evaluate_boxes(gt, dets)
  assert s["AP"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)


def test_iou_threshold_sensitivity():
  gt = _one_image([[0, 0, 10, 10]])
  # IoU = 60/100 = 0.6: a TP for 0.50, 0.55, 0.60 thresholds only.
  dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 6, 10], "score": 1.0}]
  s = coco_lib.evaluate_boxes(gt, dets)
  assert s["AP50"] == pytest.approx(1.0) and s["AP75"] == pytest.approx(0.0)
  assert s["AP"] == pytest.approx(0.3)


def test_empty_results_and_bad_input():
  gt = _one_image([[0, 0, 10, 10]])
  assert coco_lib.evaluate_boxes(gt, [])["AP"] == 0.0
  with pytest.raises(ValueError, match="images not in the GT"):
    coco_lib.evaluate_boxes(gt, [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1],
                                  "score": 1.0}])
  with pytest.raises(ValueError, match="lacks 'annotations'"):
    coco_lib.coco_from_dict({"images": [], "categories": []})


def test_conversion_and_parsed_results():
  r = coco_lib.to_results(3, [[10, 20, 30, 60]], [0.5], 2)
  assert r == [{"image_id": 3, "category_id": 2, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.5}]
  assert coco_lib.to_results(3, [], [], 2) == []
  # float32 model outputs: the xywh values are computed in float64
  r = coco_lib.to_results(3, np.float32([[0.1, 0.2, 0.4, 0.7]]), [0.5], 2)
  assert r[0]["bbox"] == [np.float32(0.1).item(), np.float32(0.2).item(),
                          np.float32(0.4).item() - np.float32(0.1).item(),
                          np.float32(0.7).item() - np.float32(0.2).item()]
  phrases = [{"phrase": "Traffic light", "boxes": [[0, 0, 2, 2], [4, 4, 8, 8]]},
             {"phrase": "unicorn", "boxes": [[1, 1, 2, 2]]}]
  res, unmatched = coco_lib.parsed_to_results(1, phrases, {"traffic_light": 2})
  assert unmatched == ["unicorn"]
  assert [x["score"] for x in res] == pytest.approx([1.0, 2 / 3])
  assert res[1]["bbox"] == [4.0, 4.0, 4.0, 4.0] and {x["category_id"] for x in res} == {2}


def test_indices_to_results_from_merged_chunks():
  boxes = [[0, 0, 10, 10], [20, 20, 30, 40], [5, 5, 6, 6]]
  res = coco_lib.indices_to_results(4, {7: [1, 0], 8: [], 9: [2]}, boxes, score="constant")
  assert [(r["category_id"], r["bbox"]) for r in res] == [
      (7, [20.0, 20.0, 10.0, 20.0]), (7, [0.0, 0.0, 10.0, 10.0]), (9, [5.0, 5.0, 1.0, 1.0])]
  with pytest.raises(ValueError, match="outside the 3 input boxes"):
    coco_lib.indices_to_results(4, {7: [3]}, boxes)


def test_lvis_reader_and_federated_filter():
  lv = _one_image([[0, 0, 10, 10]])
  lv["images"][0].update(neg_category_ids=[2], not_exhaustive_category_ids=[])
  for a in lv["annotations"]:
    a.pop("iscrowd", None)
  g = coco_lib.load_lvis(lv)
  dets = [{"image_id": 1, "category_id": c, "bbox": [0, 0, 10, 10], "score": 1.0} for c in (1, 2, 3)]
  kept = coco_lib.lvis_federated_filter(g, dets)
  assert [d["category_id"] for d in kept] == [1, 2]  # 3 is unverified in this image
  with pytest.raises(ValueError, match="not an LVIS"):
    coco_lib.load_lvis(_one_image([[0, 0, 1, 1]]))
  assert coco_lib.category_names(g) == {1: "a", 2: "b"}
