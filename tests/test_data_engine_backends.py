"""Backend post-processing helpers against their references (data_engine/backends/hf.py)."""
import numpy as np

from data_engine.backends import hf


def test_crop_adds_context_and_clips():
  img = np.arange(50 * 40 * 3, dtype=np.uint8).reshape(50, 40, 3)
  c = hf.crop(img, [10, 10, 20, 30], context=0.5)
  np.testing.assert_array_equal(c, img[0:40, 5:25])  # y: 10-10..30+10, x: 10-5..20+5
  edge = hf.crop(img, [0, 0, 40, 50], context=0.2)
  np.testing.assert_array_equal(edge, img)  # clipped to the image
  tiny = hf.crop(img, [5.2, 5.2, 5.4, 5.4], context=0.0)
  assert tiny.shape[0] >= 1 and tiny.shape[1] >= 1
