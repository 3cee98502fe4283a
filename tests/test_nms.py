"""Greedy NMS equals torchvision.ops.nms (random, tied scores, identical boxes, degenerate
boxes, thresholds on the IoU boundary), and the jit-able fixed-size variant equals the host one."""
import jax
import numpy as np
import pytest
import torch
import torchvision

from chatrex_jax.ops.nms import nms, nms_fixed


def tv_nms(boxes, scores, thr):
  return torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).numpy()


def random_boxes(rng, n, spread=50.0):
  xy = rng.uniform(0, spread, (n, 2))
  wh = rng.uniform(1, 30, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.8])
def test_random(seed, thr):
  rng = np.random.default_rng(seed)
  boxes = random_boxes(rng, 60)
  scores = rng.uniform(0, 1, 60).astype(np.float32)
  np.testing.assert_array_equal(nms(boxes, scores, thr), tv_nms(boxes, scores, thr))


def test_adversarial_ties_and_duplicates():
  rng = np.random.default_rng(7)
  base = random_boxes(rng, 12, spread=20)
  boxes = np.concatenate([base, base, base[:4] + 0.5, np.zeros((3, 4), np.float32),
                          np.array([[5, 5, 5, 9], [9, 9, 3, 3]], np.float32)])  # zero-area, inverted
  scores = np.round(rng.uniform(0, 1, len(boxes)), 1).astype(np.float32)     # many ties
  scores[:12] = 0.5                                                          # identical boxes, tied
  for thr in (0.0, 0.5, 0.8, 1.0):
    np.testing.assert_array_equal(nms(boxes, scores, thr), tv_nms(boxes, scores, thr))


def test_iou_exactly_on_threshold():
  # IoU of these two is exactly 0.5 in float32: torchvision keeps both at 0.5 (strict >).
  boxes = np.array([[0, 0, 2, 1], [0, 0, 1, 1]], np.float32)
  scores = np.array([0.9, 0.8], np.float32)
  for thr in (0.5, np.nextafter(np.float32(0.5), np.float32(0)), 0.4999999999):
    np.testing.assert_array_equal(nms(boxes, scores, float(thr)), tv_nms(boxes, scores, float(thr)))


def test_empty():
  assert nms(np.zeros((0, 4)), np.zeros((0,)), 0.5).shape == (0,)


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


def test_bad_input():
  with pytest.raises(ValueError, match=r"\[N, 4\]"):
    nms(np.zeros((3, 5)), np.zeros(3), 0.5)
