"""The paper's recall at IoU 0.5 on hand-computed cases."""
import numpy as np
import pytest

from chatrex_jax.eval import recall as R


def test_iou_matrix_hand_values():
  a = [[0, 0, 10, 10]]
  b = [[0, 0, 10, 10], [5, 0, 15, 10], [10, 10, 20, 20], [20, 20, 30, 30]]
  np.testing.assert_allclose(R.iou_matrix(a, b), [[1.0, 50 / 150, 0.0, 0.0]])
  assert R.iou_matrix(a, []).shape == (1, 0)


def test_proposal_recall_any_cover():
  gt = [np.array([[0, 0, 10, 10], [0, 0, 10, 12], [50, 50, 60, 60]]),  # 3 GT
        np.array([[0, 0, 4, 4]]),                                      # 1 GT
        np.zeros((0, 4))]                                              # no GT
  # One proposal covers both overlapping GT boxes (no one-to-one); the third is missed.
  props = [np.array([[0, 0, 10, 11], [100, 100, 110, 110]]), np.array([[0, 0, 4, 4]]),
           np.array([[1, 1, 2, 2]])]
  r = R.proposal_recall(gt, props)
  assert (r.recalled, r.total) == (3, 4)
  assert r.pooled == pytest.approx(0.75)
  assert r.per_image_mean == pytest.approx((2 / 3 + 1) / 2)
  # IoU exactly 0.5 counts (>=): [0,0,10,10] vs [0,0,10,5] has IoU 0.5.
  assert R.proposal_recall([[[0, 0, 10, 10]]], [[[0, 0, 10, 5]]]).pooled == 1.0
  assert R.proposal_recall([[[0, 0, 10, 10]]], [[[0, 0, 10, 4.9]]]).pooled == 0.0
  # max_proposals keeps the first ones only.
  assert R.proposal_recall(gt[:1], [props[0][::-1]], max_proposals=1).recalled == 0


def test_detection_recall_one_to_one_and_labels():
  gt = [np.array([[0, 0, 10, 10], [0, 0, 10, 12], [50, 50, 60, 60]])]
  gl = [[1, 1, 2]]
  pred = [np.array([[0, 0, 10, 11], [50, 50, 60, 60]])]
  pl = [[1, 1]]  # the second prediction has the wrong label
  r = R.detection_recall(gt, gl, pred, pl)
  assert (r.recalled, r.total) == (1, 3)  # one prediction can recall one GT only
  r2 = R.detection_recall(gt, gl, pred, pl, one_to_one=False)
  assert r2.recalled == 2  # any-cover, same label: both overlapping GT
  # The higher-scored prediction picks first; it takes its best GT.
  m = R.match_detections([[0, 0, 10, 10], [0, 0, 10, 14]], [1, 1],
                         [[0, 0, 10, 13], [0, 0, 10, 10]], [1, 1], pred_scores=[0.1, 0.9])
  assert m.tolist() == [True, True]
  with pytest.raises(ValueError, match="one entry per image"):
    R.detection_recall(gt, gl, pred, [])
  with pytest.raises(ValueError, match=r"\[N, 4\]"):
    R.proposal_recall([[[0, 0, 1]]], [[[0, 0, 1, 1]]])
