"""RoI-align (chatrex_jax/ops/roi_align.py) against live torchvision.ops.roi_align and the goldens.

Run: pytest tests/test_roi_align.py
"""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from chatrex_jax import testing
from chatrex_jax.ops import roi_align as ra

TOL = 1e-5  # docs/architecture.md "Numeric tolerances": fp32 ops, max abs error <= 1e-5 of the output scale


def _boxes(height: int, width: int, scale: float, rng: np.random.Generator) -> np.ndarray:
  """Named corner cases + random boxes, xyxy in image pixels (feature = box * scale)."""
  ih, iw = height / scale, width / scale
  cell = 1 / scale
  named = [
      [0, 0, iw, ih],                                   # whole image
      [-0.3 * iw, -0.2 * ih, 0.4 * iw, 0.5 * ih],       # partly outside, top-left
      [0.6 * iw, 0.7 * ih, 1.3 * iw, 1.2 * ih],         # partly outside, bottom-right
      [1.2 * iw, 1.1 * ih, 1.5 * iw, 1.4 * ih],         # fully outside
      [-0.9 * cell, -0.9 * cell, -0.2 * cell, -0.1 * cell],  # outside, within the -1 margin
      [2.3 * cell, 1.1 * cell, 2.7 * cell, 1.4 * cell],  # smaller than one cell
      [0.5 * iw, 0.2 * ih, 0.5 * iw, 0.8 * ih],         # zero width
      [0.3 * iw, 0.3 * ih, 0.3 * iw, 0.3 * ih],         # point
      [0.7 * iw, 0.2 * ih, 0.2 * iw, 0.6 * ih],         # inverted (x2 < x1)
      [0.1 * iw, ih - 0.4 * cell, 0.9 * iw, ih],        # bottom border strip
      [-2.0 * iw, -1.5 * ih, 3.0 * iw, 2.5 * ih],       # much larger than the map
  ]
  xy = rng.uniform(-0.2, 1.1, size=(9, 2)) * [iw, ih]
  wh = rng.uniform(0.02, 0.9, size=(9, 2)) * [iw, ih]
  rand = np.concatenate([xy, xy + wh], axis=1)
  return np.concatenate([np.asarray(named), rand]).astype(np.float32)


def _torch_roi(feats_nchw, rois, size, scale, sampling, aligned):
  return torchvision.ops.roi_align(torch.from_numpy(feats_nchw), torch.from_numpy(rois), size,
                                   scale, sampling, aligned).numpy()


@pytest.mark.parametrize("scale", [0.25, 1.0])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling", [-1, 2])
def test_matches_torchvision(scale, aligned, sampling, highest_precision):
  rng = np.random.default_rng(int(scale * 4) + 10 * aligned + 100 * (sampling > 0))
  b, h, w, c = 2, 11, 17, 3
  feats = rng.standard_normal((b, c, h, w)).astype(np.float32)
  boxes = _boxes(h, w, scale, rng)
  if aligned and sampling <= 0:
    # torchvision's CPU kernel sizes a vector by gh * gw * P * P and raises ("cannot create
    # std::vector larger than max_size()") when exactly one axis is inverted (gh < 0 < gw).
    # The rule (gh <= 0 or gw <= 0 -> zeros, as in its loops and CUDA kernel) is checked here.
    inverted = boxes[8:9]
    got = ra.roi_align(jnp.asarray(feats.transpose(0, 2, 3, 1)), jnp.asarray(
        np.concatenate([[[0.0]], inverted], 1)), 7, scale, sampling, aligned)
    assert np.all(np.asarray(got) == 0)
    boxes = np.delete(boxes, 8, axis=0)[:-1]  # keep an even count for the [B, O, 4] layout
  batch_idx = (np.arange(len(boxes)) % b).astype(np.float32)
  rois = np.concatenate([batch_idx[:, None], boxes], axis=1)
  out_size = (7, 5)
  want = _torch_roi(feats, rois, out_size, scale, sampling, aligned)       # [K, C, 7, 5]
  bound = ra.required_sampling_grid(rois, out_size, scale, aligned)
  fn = jax.jit(lambda f, r: ra.roi_align(f, r, out_size, scale, sampling, aligned,
                                         max_sampling_grid=bound, grid_overflow="nan"))
  got = np.asarray(fn(jnp.asarray(feats.transpose(0, 2, 3, 1)), jnp.asarray(rois)))
  testing.assert_close_to_scale(got.transpose(0, 3, 1, 2), want, TOL, "roi_align [K,5]")
  # Per-image padded layout [B, O, 4] gives the same values.
  per_image = boxes.reshape(len(boxes) // b, b, 4).transpose(1, 0, 2)     # row k -> (k % b, k//b)
  got_b = np.asarray(ra.roi_align(jnp.asarray(feats.transpose(0, 2, 3, 1)),
                                  jnp.asarray(per_image), out_size, scale, sampling, aligned,
                                  max_sampling_grid=bound))
  want_b = want.reshape(len(boxes) // b, b, c, *out_size).transpose(1, 0, 3, 4, 2)
  testing.assert_close_to_scale(got_b, want_b, TOL, "roi_align [B,O,4]")


@pytest.mark.parametrize("aligned", [False, True])
def test_feature_gradient_matches_torch_autograd(aligned, highest_precision):
  rng = np.random.default_rng(7)
  b, h, w, c, scale = 2, 9, 12, 2, 0.5
  feats = rng.standard_normal((b, c, h, w)).astype(np.float32)
  boxes = _boxes(h, w, scale, rng)
  rois = np.concatenate([(np.arange(len(boxes)) % b)[:, None], boxes], 1).astype(np.float32)
  cot = rng.standard_normal((len(rois), c, 7, 7)).astype(np.float32)

  ft = torch.from_numpy(feats).requires_grad_(True)
  out = torchvision.ops.roi_align(ft, torch.from_numpy(rois), 7, scale, -1, aligned)
  (out * torch.from_numpy(cot)).sum().backward()
  want = ft.grad.numpy().transpose(0, 2, 3, 1)

  bound = ra.required_sampling_grid(rois, 7, scale, aligned)
  loss = lambda f: jnp.sum(ra.roi_align(f, jnp.asarray(rois), 7, scale, -1, aligned,
                                        max_sampling_grid=bound)
                           * jnp.asarray(cot.transpose(0, 2, 3, 1)))
  got = jax.grad(loss)(jnp.asarray(feats.transpose(0, 2, 3, 1)))
  testing.assert_close_to_scale(got, want, TOL, "d loss / d features")


def test_golden_fixtures(golden_dir):
  from chatrex_jax.tools import check_equivalence
  for name in ("roi_align_square_s0.25", "roi_align_nonsquare_s1"):
    buf = io.StringIO()
    assert check_equivalence.check(golden_dir / name, out=buf), buf.getvalue()
    assert f"PASS {name}" in buf.getvalue()


def test_grid_overflow_policies(highest_precision):
  rng = np.random.default_rng(3)
  feats = rng.standard_normal((1, 1, 8, 8)).astype(np.float32)
  # Box 0 needs a grid of ceil(40 / 7) = 6; box 1 needs 1.
  rois = np.array([[0, -16, -16, 24, 24], [0, 1, 1, 5, 6]], np.float32)
  assert ra.required_sampling_grid(rois, 7, 1.0) == 6
  nhwc = jnp.asarray(feats.transpose(0, 2, 3, 1))
  exact = ra.roi_align(nhwc, rois, 7, 1.0, max_sampling_grid=6)
  testing.assert_close_to_scale(np.asarray(exact).transpose(0, 3, 1, 2),
                                _torch_roi(feats, rois, 7, 1.0, -1, False), TOL)
  # "clamp": the overflowing box is sampled as torchvision does with sampling_ratio=4.
  clamped = np.asarray(ra.roi_align(nhwc, rois, 7, 1.0, max_sampling_grid=4))
  want = _torch_roi(feats, rois[:1], 7, 1.0, 4, False)
  testing.assert_close_to_scale(clamped[:1].transpose(0, 3, 1, 2), want, TOL)
  assert not np.allclose(clamped[0], np.asarray(exact)[0], atol=1e-4)  # it is a deviation
  # "nan": only the overflowing box is poisoned.
  poisoned = np.asarray(ra.roi_align(nhwc, rois, 7, 1.0, max_sampling_grid=4,
                                     grid_overflow="nan"))
  assert np.isnan(poisoned[0]).all() and np.isfinite(poisoned[1]).all()
  # Host-side error check.
  ra.check_sampling_grid(rois, 7, 1.0, 6)
  with pytest.raises(ValueError, match=r"1 box\(es\).*up to 6.*max_sampling_grid=4.*\[0\]"):
    ra.check_sampling_grid(rois, 7, 1.0, 4)


def test_default_bound_covers_boxes_twice_the_map():
  h = w = 24
  assert ra.default_max_sampling_grid((h, w), 7) == 7
  box = np.array([[-12, -12, 36, 36]], np.float32)  # 48 cells = 2x the map
  assert ra.required_sampling_grid(box, 7, 1.0) <= ra.default_max_sampling_grid((h, w), 7)


def test_bad_inputs_raise():
  f = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(ValueError, match="NHWC"):
    ra.roi_align(jnp.zeros((4, 4, 3)), jnp.zeros((1, 5)), 7)
  with pytest.raises(ValueError, match=r"\[K, 5\]"):
    ra.roi_align(f, jnp.zeros((3, 4)), 7)
  with pytest.raises(ValueError, match=r"\[B=2, O, 4\]"):
    ra.roi_align(f, jnp.zeros((1, 3, 4)), 7)
  with pytest.raises(ValueError, match="output_size"):
    ra.roi_align(f, jnp.zeros((2, 3, 4)), 0)
  with pytest.raises(ValueError, match="grid_overflow"):
    ra.roi_align(f, jnp.zeros((2, 3, 4)), 7, grid_overflow="wrap")
