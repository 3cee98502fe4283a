"""Backend post-processing helpers against their references (data_engine/backends/hf.py)."""
import numpy as np
import pytest

from data_engine.backends import hf


def test_nms_matches_torchvision():
  torch = pytest.importorskip("torch")
  tv = pytest.importorskip("torchvision")
  rng = np.random.RandomState(0)
  for trial in range(20):
    n = rng.randint(1, 60)
    xy = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(1, 40, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.permutation(n).astype(np.float32) / n  # distinct scores: unique order
    for iou in (0.3, 0.5, 0.7):
      want = tv.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).tolist()
      assert hf.nms(boxes, scores, iou) == want, (trial, iou)


def test_crop_adds_context_and_clips():
  img = np.arange(50 * 40 * 3, dtype=np.uint8).reshape(50, 40, 3)
  c = hf.crop(img, [10, 10, 20, 30], context=0.5)
  np.testing.assert_array_equal(c, img[0:40, 5:25])  # y: 10-10..30+10, x: 10-5..20+5
  edge = hf.crop(img, [0, 0, 40, 50], context=0.2)
  np.testing.assert_array_equal(edge, img)  # clipped to the image
  tiny = hf.crop(img, [5.2, 5.2, 5.4, 5.4], context=0.0)
  assert tiny.shape[0] >= 1 and tiny.shape[1] >= 1
