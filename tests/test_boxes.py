"""The box library (chatrex_jax/ops/boxes.py): torchvision's box_iou / generalized_box_iou /
box_convert as the live reference; degenerate pairs (zero-area, inverted, disjoint, touching,
identical boxes) give 0, never nan, also in gradients; numpy and jnp agree (plain and under
jit); the dtype rules; host users import it without loading jax."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from chatrex_jax.ops import boxes as B

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EDGE = np.array([
    [0, 0, 10, 10],    # a proper box
    [0, 0, 10, 10],    # identical to it
    [10, 0, 20, 10],   # touching it (shared edge, no area in common)
    [5, 0, 15, 10],    # half overlapping it: IoU 50 / 150
    [30, 30, 40, 40],  # disjoint
    [5, 5, 5, 5],      # a point inside the first box
    [5, 5, 5, 5],      # the same point
    [2, 2, 2, 8],      # zero width
    [9, 9, 3, 3],      # inverted on both axes (positive signed area)
    [8, 0, 2, 10],     # inverted on x only (negative signed area)
], np.float64)


def random_boxes(rng, n, spread=50.0, dtype=np.float64):
  xy = rng.uniform(0, spread, (n, 2))
  return np.concatenate([xy, xy + rng.uniform(0.5, 30, (n, 2))], 1).astype(dtype)


def tv(fn, a, b):
  return fn(torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b))).numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_iou_and_giou_equal_torchvision(dtype):
  rng = np.random.default_rng(0)
  a, b = random_boxes(rng, 40, dtype=dtype), random_boxes(rng, 30, dtype=dtype)
  iou = B.pairwise_iou(a, b)
  assert iou.dtype == dtype
  np.testing.assert_array_equal(iou, tv(torchvision.ops.box_iou, a, b))
  np.testing.assert_allclose(B.pairwise_giou(a, b), tv(torchvision.ops.generalized_box_iou, a, b),
                             rtol=1e-6 if dtype == np.float32 else 1e-14, atol=1e-7)


def test_edge_cases_hand_values():
  iou = B.pairwise_iou(EDGE, EDGE)
  assert iou[0, 1] == 1.0 and iou[0, 3] == 50 / 150
  assert iou[0, 2] == 0.0 and iou[0, 4] == 0.0  # touching, disjoint
  assert iou[5, 6] == 0.0 and iou[5, 5] == 0.0  # two identical points: 0, not 0/0
  assert iou[7, 7] == 0.0 and iou[8, 8] == 0.0 and iou[9, 9] == 0.0  # zero width, inverted
  assert np.all((iou >= 0) & (iou <= 1)) and not np.signbit(iou).any()
  giou = B.pairwise_giou(EDGE, EDGE)
  assert np.isfinite(giou).all() and giou[5, 6] == 0.0  # identical points: empty hull too
  assert giou[0, 4] == pytest.approx(-(1600 - 200) / 1600)


def test_edge_cases_follow_torchvision_where_it_is_defined():
  # torchvision divides by the union as it is: 0/0 = nan for two zero-area boxes (and 0 over
  # a negative union for inverted ones); elsewhere it must agree with us exactly.
  iou = B.pairwise_iou(EDGE, EDGE)
  want = tv(torchvision.ops.box_iou, EDGE, EDGE)
  defined = np.isfinite(want)
  assert (~defined).sum() > 0
  np.testing.assert_array_equal(iou[defined], want[defined])
  np.testing.assert_array_equal(iou[~defined], 0.0)
  proper = EDGE[:8]  # GIoU needs x2 >= x1, y2 >= y1
  giou, want = B.pairwise_giou(proper, proper), tv(torchvision.ops.generalized_box_iou, proper, proper)
  defined = np.isfinite(want)
  np.testing.assert_allclose(giou[defined], want[defined], rtol=1e-14)


def test_numpy_and_jnp_agree():
  rng = np.random.default_rng(1)
  a = np.concatenate([random_boxes(rng, 20), EDGE]).astype(np.float32)
  b = np.concatenate([EDGE, random_boxes(rng, 15)]).astype(np.float32)
  for fn in (B.pairwise_iou, B.pairwise_giou, B.pairwise_intersection):
    host = fn(a, b)
    plain = fn(jnp.asarray(a), jnp.asarray(b))
    jitted = jax.jit(fn)(a, b)
    assert isinstance(host, np.ndarray) and isinstance(plain, jax.Array)
    assert host.dtype == plain.dtype == jitted.dtype == np.float32
    np.testing.assert_allclose(np.asarray(plain), host, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(jitted), host, rtol=1e-6, atol=1e-7)
  for fn in (B.area, B.xyxy_to_xywh, B.xywh_to_xyxy, B.xyxy_to_cxcywh, B.cxcywh_to_xyxy):
    np.testing.assert_array_equal(np.asarray(jax.jit(fn)(a)), fn(a))


def test_gradients_are_finite_on_degenerate_boxes():
  boxes = jnp.asarray(EDGE, jnp.float32)
  for fn in (B.pairwise_iou, B.pairwise_giou):
    grad = jax.jit(jax.grad(lambda x, fn=fn: fn(x, x).sum()))(boxes)
    assert np.isfinite(np.asarray(grad)).all(), fn.__name__


def test_leading_dimensions():
  rng = np.random.default_rng(2)
  a = random_boxes(rng, 2 * 3 * 5).reshape(2, 3, 5, 4)
  b = random_boxes(rng, 2 * 3 * 4).reshape(2, 3, 4, 4)
  got = B.pairwise_giou(a, b)
  assert got.shape == (2, 3, 5, 4)
  np.testing.assert_array_equal(got[1, 2], B.pairwise_giou(a[1, 2], b[1, 2]))


@pytest.mark.parametrize("fmt", ["xywh", "cxcywh"])
def test_conversions_equal_torchvision(fmt):
  rng = np.random.default_rng(3)
  xyxy = random_boxes(rng, 25)
  to_fmt, from_fmt = {"xywh": (B.xyxy_to_xywh, B.xywh_to_xyxy),
                      "cxcywh": (B.xyxy_to_cxcywh, B.cxcywh_to_xyxy)}[fmt]
  other = to_fmt(xyxy)
  want = torchvision.ops.box_convert(torch.from_numpy(xyxy), "xyxy", fmt).numpy()
  np.testing.assert_allclose(other, want, rtol=1e-15, atol=1e-12)
  np.testing.assert_allclose(from_fmt(other), xyxy, rtol=1e-15, atol=1e-12)
  back = torchvision.ops.box_convert(torch.from_numpy(other), fmt, "xyxy").numpy()
  np.testing.assert_allclose(from_fmt(other), back, rtol=1e-15, atol=1e-12)


def test_dtype_rules():
  f32 = np.float32([[1, 2, 5, 9]])
  assert B.xyxy_to_xywh(f32).dtype == np.float32            # a float dtype is kept
  assert B.xyxy_to_xywh(f32.astype(np.float64)).dtype == np.float64
  assert B.xyxy_to_xywh([[1, 2, 5, 9]]).dtype == np.float64  # ints / python -> float64
  assert B.xyxy_to_xywh(f32, dtype=np.float64).dtype == np.float64
  assert B.pairwise_iou(f32, f32.astype(np.float64)).dtype == np.float64  # numpy promotion
  # float64 arithmetic on float32 input differs from float32 arithmetic: dtype= is honoured
  x = np.float32([[0.1, 0.2, 0.4, 0.7]])
  assert B.xyxy_to_xywh(x, dtype=np.float64)[0, 2] == float(x[0, 2]) - float(x[0, 0])
  # jax: the input dtype, jax's default float for integers; one jax argument selects jnp
  assert B.area(jnp.asarray([[1, 2, 5, 9]])).dtype == jnp.float32
  assert B.xyxy_to_cxcywh(jnp.asarray(f32, jnp.bfloat16)).dtype == jnp.bfloat16
  assert isinstance(B.pairwise_iou(f32, jnp.asarray(f32)), jax.Array)


def test_area_is_signed_and_intersection_is_not():
  assert B.area(EDGE[7:]).tolist() == [0.0, 36.0, -60.0]
  assert (B.pairwise_intersection(EDGE, EDGE) >= 0).all()


def test_bad_shape():
  with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
    B.pairwise_iou(np.zeros((3, 5)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
    B.xyxy_to_xywh(jnp.zeros((3,)))


def test_host_users_do_not_load_jax():
  code = ("import sys; import numpy as np; from chatrex_jax.ops import boxes, nms; "
          "import data_engine.stages, data_engine.backends.oracle; "
          "nms.nms(np.float32([[0, 0, 2, 2], [0, 0, 2, 1]]), np.float32([1, .5]), .4); "
          "boxes.pairwise_giou([[0, 0, 1, 1]], [[0, 0, 2, 2]]); "
          "assert 'jax' not in sys.modules, 'jax was imported'")
  env = dict(os.environ, PYTHONPATH=REPO)
  subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
