"""RexSeek precision / recall / DensityF1: the code's definition (docs/architecture.md D) on hand cases."""
import numpy as np
from pycocotools import mask as mask_utils
import pytest

from chatrex_jax.eval import density_f1 as D
from chatrex_jax.ops import boxes as box_ops

A, B = [0, 0, 10, 10], [2, 0, 12, 10]
P1, P2 = [1, 0, 11, 10], [-3, 0, 7, 10]  # IoU(A,P1)=IoU(B,P1)=90/110, IoU(A,P2)=70/130, IoU(B,P2)=1/3


def test_iou_no_plus_one():
  def iou(a, b):  # the IoU match_boxes uses
    return float(box_ops.pairwise_iou([a], [b], dtype=np.float64)[0, 0])
  assert iou(A, P1) == pytest.approx(90 / 110)
  assert iou(A, [10, 0, 20, 10]) == 0.0  # touching: no overlap
  assert iou(A, [0, 0, 10, 5]) == 0.5
  assert D.match_boxes([A], [[0, 0, 10, 5]], 0.5) == (1.0, 1.0)  # IoU exactly 0.5 matches
  assert D.match_boxes([A], [[10, 0, 20, 10]], 0.0) == (0.0, 0.0)  # IoU 0 never matches


def test_greedy_matching_follows_gt_order():
  # A takes its best unused prediction (P1); B is then left with P2 (IoU 1/3) -> 1 match.
  assert D.match_boxes([A, B], [P1, P2], 0.5) == (0.5, 0.5)
  # In the other GT order both match (B takes P1, A takes P2): the greedy rule, not optimal.
  assert D.match_boxes([B, A], [P1, P2], 0.5) == (1.0, 1.0)
  assert D.match_boxes([A, B], [P1, P2], 0.85) == (0.0, 0.0)


def test_empty_and_failed_predictions():
  assert D.match_boxes([A], [], 0.5) == (0.0, 0.0)
  assert D.match_boxes([A], [[]], 0.5) == (0.0, 0.0)
  m = D.sample_metrics([A], [[]], 5)
  assert all(m[k] == 0 for k in D.BOX_KEYS) and m["num_pred"] == 1
  with pytest.raises(ValueError, match="at least one GT"):
    D.match_boxes([], [A])


def test_threshold_average_uses_official_arange():
  assert len(D.THRESHOLDS) == 10 and D.THRESHOLDS[4] > 0.7  # 0.7000000000000002
  m = D.sample_metrics([A], [[0, 0, 10, 7.2]], 3)  # IoU 0.72 -> matched at 0.50..0.70 (5/10)
  assert (m["recall_50"], m["precision_50"], m["density_f1_50"]) == (1.0, 1.0, 1.0)
  assert m["recall_mean"] == pytest.approx(0.5) and m["density_f1_mean"] == pytest.approx(0.5)
  m = D.sample_metrics([A], [[0, 0, 10, 7]], 3)  # IoU exactly 0.7 < 0.7000000000000002
  assert m["recall_mean"] == pytest.approx(0.4)


def test_density_penalty_min_gt_over_pred():
  far = [[50, 50, 60, 60], [70, 70, 80, 80]]
  m = D.sample_metrics([A], [A] + far, 4)  # R 1, P 1/3, F1 1/2, penalty min(1, 1/3)
  assert m["density_f1_50"] == pytest.approx(0.5 / 3)
  m = D.sample_metrics([A, [50, 50, 60, 60], [70, 70, 80, 80]], [A], 4)  # R 1/3, P 1, penalty 1
  assert m["density_f1_50"] == pytest.approx(0.5)
  # The candidate count cancels, except that no candidates -> penalty 0.
  assert D.density_f1(1.0, 1.0, 2, 4, 7) == D.density_f1(1.0, 1.0, 2, 4, 100) == 0.5
  assert D.density_f1(1.0, 1.0, 2, 2, 0) == 0.0
  assert D.density_f1(0.0, 0.0, 2, 2, 5) == 0.0
  assert D.density_f1(1.0, 1.0, 1, 0, 5) == 0.0  # no predictions -> penalty 0


def _rle(h, w, y0, y1, x0, x1):
  m = np.zeros((h, w), np.uint8)
  m[y0:y1, x0:x1] = 1
  r = mask_utils.encode(np.asfortranarray(m))
  return {"size": r["size"], "counts": r["counts"].decode("ascii")}  # as stored in JSON


def test_point_mode_cases():
  m1, m2 = _rle(20, 20, 0, 5, 0, 5), _rle(20, 20, 10, 20, 10, 20)
  # m1 takes the first unused point inside it (p0); m2 takes p2; p1 stays unmatched.
  assert D.match_points([m1, m2], [[1, 1], [2, 2], [15, 15]]) == (1.0, 2 / 3)
  assert D.match_points([m1], [[4.4, 4.6]]) == (0.0, 0.0)  # rounds to (4, 5): outside
  assert D.match_points([m1], [[4.4, 4.4]]) == (1.0, 1.0)
  assert D.match_points([m1], [[-1, 2], [25, 2]]) == (0.0, 0.0)  # out of bounds
  assert D.match_points([], []) == (1.0, 1.0)  # no GT, no points
  assert D.match_points([], [[1, 1]]) == (0.0, 0.0)  # no GT
  assert D.match_points([m1], []) == (0.0, 1.0)  # no points
  assert D.match_points([m1], [[]]) == (0.0, 1.0)  # [[]] = no points (official would crash)
  s = D.sample_metrics([A, B], [[1, 1], [2, 2], [15, 15]], 6, point_mode=True, gt_masks=[m1, m2])
  assert s["density_f1"] == pytest.approx(0.8 * 2 / 3)  # F1 0.8, penalty min(1, 2/3)


def _gt(i, domain, sub, n_gt, n_cand=20):
  return {"id": i, "domain": domain, "sub_domain": sub, "candidate_boxes": [A] * n_cand,
          "answer_boxes": [[20 * k, 0, 20 * k + 10, 10] for k in range(n_gt)]}


def test_dataset_aggregation_rejection_and_buckets():
  gt = [_gt(1, "attr", "color", 1), _gt(2, "attr", "color", 3), _gt(3, "attr", "shape", 7),
        _gt(4, "pos", "inner", 12), _gt(5, "rejection", "rej", 0), _gt(6, "rejection", "rej", 0),
        _gt(7, "rejection", "rej", 0)]
  perfect = lambda g: [list(b) for b in g["answer_boxes"]]
  preds = [{"id": 1, "extracted_predictions": perfect(gt[0])},             # all 1
           {"id": 2, "extracted_predictions": perfect(gt[1])[:1]},         # R 1/3 P 1
           {"id": 3, "extracted_predictions": [[]]},                       # 0
           {"id": 4, "extracted_predictions": perfect(gt[3])},             # all 1
           {"id": 5, "extracted_predictions": [[]]},                       # rejected: counted
           {"id": 6, "extracted_predictions": [[0, 0, 1, 1]]}]            # not rejected
  # id 7 has no prediction record -> empty -> counted as a correct rejection.
  res = D.evaluate_dataset(gt, preds)
  assert not res.is_point and res.rejection_score == 2 and res.rejection_total == 3
  s = res.summary()
  assert s["domain"]["attr"]["recall_50"] == pytest.approx((1 + 1 / 3 + 0) / 3)
  assert s["domain"]["pos"]["recall_50"] == 1.0
  # "Average / All Data" pools the 4 non-rejection samples (not the mean of domain means).
  assert s["average"]["recall_50"] == pytest.approx((1 + 1 / 3 + 0 + 1) / 4)
  assert s["average"]["count"] == 4
  assert s["subdomain"]["color"]["count"] == 2 and s["subdomain"]["shape"]["domain"] == "attr"
  assert list(s["box_count"]) == ["1", "2-5", "6-10", ">10"]
  assert s["box_count"]["2-5"]["density_f1_50"] == pytest.approx(0.5)
  assert "rejection" not in s["domain"]
  md, js = D.comparison_tables({"m": res})
  assert "| Average | All Data | m |" in md and js["rejection"]["m"]["rejection_score"] == 2
  assert D.box_count_bucket(0) == ">10"  # the official quirk


def test_non_rejection_without_gt_raises_and_point_autodetect():
  with pytest.raises(ValueError, match="only the rejection domain may be empty"):
    D.evaluate_dataset([_gt(1, "attr", "c", 0)], [{"id": 1, "extracted_predictions": [[]]}])
  m1 = _rle(20, 20, 0, 5, 0, 5)
  g = dict(_gt(1, "attr", "c", 1), answer_segmentations=[m1])
  res = D.evaluate_dataset([g], [{"id": 1, "extracted_predictions": [[2, 2]]}])
  assert res.is_point and res.summary()["average"]["density_f1"] == 1.0


def test_table_sorted_by_density_f1():
  gt = [_gt(1, "attr", "color", 1)]
  good = D.evaluate_dataset(gt, [{"id": 1, "extracted_predictions": [gt[0]["answer_boxes"][0]]}])
  bad = D.evaluate_dataset(gt, [{"id": 1, "extracted_predictions": [[]]}])
  md, js = D.comparison_tables({"bad": bad, "good": good})
  rows = [r for r in js["domain_subdomain_metrics"] if r["subdomain"] == "Overall"]
  assert [r["model"] for r in rows] == ["good", "bad"]


def test_mixed_point_and_box_models_in_one_table():
  g = dict(_gt(1, "attr", "c", 1), answer_segmentations=[_rle(20, 20, 0, 5, 0, 5)])
  pt = D.evaluate_dataset([g], [{"id": 1, "extracted_predictions": [[2, 2]]}])
  bx = D.evaluate_dataset([g], [{"id": 1, "extracted_predictions": [[]]}])
  md, js = D.comparison_tables({"points": pt, "boxes": bx})
  assert "DensityF1@Point" in md and "DensityF1@0.5:0.95" in md
  row = next(l for l in md.splitlines() if l.startswith("| Average | All Data | points |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[3:6] == ["1.000", "1.000", "1.000"] and cells[6:12] == [""] * 6
