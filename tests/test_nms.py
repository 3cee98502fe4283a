"""Greedy NMS equals torchvision.ops.nms (random, tied scores, identical boxes, degenerate
boxes, thresholds on the IoU boundary; float32 and float64 as torchvision computes in the
tensor's dtype), and the jit-able fixed-size variant equals the host one."""
import jax
import numpy as np
import pytest
import torch
import torchvision

from chatrex_jax.ops.nms import nms, nms_fixed


def tv_nms(boxes, scores, thr):
  return torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).numpy()


def random_boxes(rng, n, spread=50.0, dtype=np.float32):
  xy = rng.uniform(0, spread, (n, 2))
  wh = rng.uniform(1, 30, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(dtype)


def adversarial_boxes(rng, dtype=np.float32):
  """Identical boxes with tied scores, near-duplicates, zero-area and inverted boxes."""
  base = random_boxes(rng, 12, spread=20, dtype=dtype)
  boxes = np.concatenate([base, base, base[:4] + 0.5, np.zeros((3, 4), dtype),
                          np.array([[5, 5, 5, 9], [9, 9, 3, 3]], dtype)])  # zero-area, inverted
  scores = np.round(rng.uniform(0, 1, len(boxes)), 1).astype(dtype)      # many ties
  scores[:12] = 0.5                                                      # identical boxes, tied
  return boxes, scores


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random(seed, thr, dtype):
  rng = np.random.default_rng(seed)
  boxes = random_boxes(rng, 60, dtype=dtype)
  scores = rng.uniform(0, 1, 60).astype(dtype)
  np.testing.assert_array_equal(nms(boxes, scores, thr), tv_nms(boxes, scores, thr))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adversarial_ties_and_duplicates(dtype):
  boxes, scores = adversarial_boxes(np.random.default_rng(7), dtype)
  for thr in (0.0, 0.5, 0.8, 1.0):
    np.testing.assert_array_equal(nms(boxes, scores, thr), tv_nms(boxes, scores, thr))


def test_float64_boxes_with_float32_scores():
  # The data engine's grounding backend: float64 pixel boxes, float32 scores. IoU in float64,
  # the order from the float32 scores (exact in float64, so torchvision's float64 run agrees).
  rng = np.random.default_rng(3)
  boxes = random_boxes(rng, 50, spread=30, dtype=np.float64) * 3.7
  scores = rng.permutation(50).astype(np.float32) / 50
  for thr in (0.3, 0.5, 0.7):
    np.testing.assert_array_equal(nms(boxes, scores, thr),
                                  tv_nms(boxes, scores.astype(np.float64), thr))


def test_negative_threshold():
  # Proper boxes: everything after the best box is suppressed, as torchvision does.
  rng = np.random.default_rng(5)
  boxes = random_boxes(rng, 20)
  scores = rng.uniform(0, 1, 20).astype(np.float32)
  np.testing.assert_array_equal(nms(boxes, scores, -0.5), tv_nms(boxes, scores, -0.5))
  # The documented difference: two zero-area boxes have IoU 0 here (torchvision: 0/0 = nan,
  # never above the threshold, so the second one is kept).
  boxes = np.array([[1, 1, 1, 3], [1, 1, 1, 3]], np.float32)
  scores = np.array([0.9, 0.8], np.float32)
  assert nms(boxes, scores, -0.5).tolist() == [0]
  assert tv_nms(boxes, scores, -0.5).tolist() == [0, 1]


def test_iou_exactly_on_threshold():
  # IoU of these two is exactly 0.5 in float32: torchvision keeps both at 0.5 (strict >).
  boxes = np.array([[0, 0, 2, 1], [0, 0, 1, 1]], np.float32)
  scores = np.array([0.9, 0.8], np.float32)
  for thr in (0.5, np.nextafter(np.float32(0.5), np.float32(0)), 0.4999999999):
    np.testing.assert_array_equal(nms(boxes, scores, float(thr)), tv_nms(boxes, scores, float(thr)))


def test_empty():
  keep = nms(np.zeros((0, 4)), np.zeros((0,)), 0.5)
  assert keep.shape == (0,) and keep.dtype == np.int64


@pytest.mark.parametrize("seed", range(3))
def test_fixed_size_variant_matches(seed):
  rng = np.random.default_rng(seed)
  boxes = random_boxes(rng, 40, spread=30)
  scores = np.round(rng.uniform(0, 1, 40), 2).astype(np.float32)
  valid = scores >= 0.3
  fn = jax.jit(nms_fixed, static_argnums=2)
  for thr in (0.5, 0.8):
    keep = np.asarray(fn(boxes, scores, thr, valid))
    idx = np.flatnonzero(valid)
    want = set(idx[tv_nms(boxes[idx], scores[idx], thr)].tolist())
    assert set(np.flatnonzero(keep).tolist()) == want


def test_fixed_size_variant_on_degenerate_boxes():
  boxes, scores = adversarial_boxes(np.random.default_rng(11))
  fn = jax.jit(nms_fixed, static_argnums=2)
  for thr in (0.0, 0.5, 1.0):
    keep = np.asarray(fn(boxes, scores, thr))
    assert set(np.flatnonzero(keep).tolist()) == set(tv_nms(boxes, scores, thr).tolist())


def test_bad_input():
  with pytest.raises(ValueError, match=r"\[N, 4\]"):
    nms(np.zeros((3, 5)), np.zeros(3), 0.5)
