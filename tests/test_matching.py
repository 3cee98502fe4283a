"""Linear sum assignment (pure JAX + SciPy callback) and the DINO Hungarian matcher.

References: `scipy.optimize.linear_sum_assignment` for the solver, and DINO's
HungarianMatcher written here in torch (torchvision's generalized_box_iou) + SciPy for the
matcher.
"""
import functools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import torch
import torchvision

from chatrex_jax import testing
from chatrex_jax.train import matching

lsa = matching.linear_sum_assignment


@functools.lru_cache(maxsize=None)
def _jitted(solver):
  return jax.jit(functools.partial(lsa, solver=solver))


def _check_against_scipy(cost, solver="jax", same_assignment=False, atol=None):
  """Runs our solver (jitted) and SciPy on `cost`; checks the contract and the optimum."""
  cost = np.asarray(cost)
  rows, cols = (np.asarray(x) for x in _jitted(solver)(jnp.asarray(cost)))
  k = min(cost.shape)
  assert rows.dtype == np.int32 and cols.dtype == np.int32
  assert rows.shape == (k,) and cols.shape == (k,)
  assert np.all(np.diff(rows) > 0), f"rows not strictly ascending: {rows}"
  assert len(set(cols.tolist())) == k, f"columns repeat: {cols}"
  assert rows.min() >= 0 and rows.max() < cost.shape[0]
  assert cols.min() >= 0 and cols.max() < cost.shape[1]
  r0, c0 = scipy.optimize.linear_sum_assignment(cost.astype(np.float64))
  ours = cost.astype(np.float64)[rows, cols].sum()
  ref = cost.astype(np.float64)[r0, c0].sum()
  if atol is None:
    # float32 solver: the optimum is found up to float32 resolution of the entries.
    atol = 1e-5 * max(1.0, np.abs(cost).max()) * k
  assert abs(ours - ref) <= atol, f"total {ours} != scipy {ref} (shape {cost.shape})"
  if same_assignment:
    np.testing.assert_array_equal(rows, r0)
    np.testing.assert_array_equal(cols, c0)
  return rows, cols


SHAPES = [(1, 1), (1, 6), (6, 1), (5, 5), (9, 4), (4, 9), (24, 24), (40, 7), (7, 40)]


@pytest.mark.parametrize("solver", ["jax", "scipy"])
@pytest.mark.parametrize("shape", SHAPES)
def test_random_costs_match_scipy_exactly(shape, solver):
  rng = np.random.default_rng(sum(shape))
  cost = rng.normal(size=shape).astype(np.float32)  # unique optimum almost surely
  _check_against_scipy(cost, solver, same_assignment=True)


@pytest.mark.parametrize("shape", [(6, 6), (8, 3), (3, 8)])
def test_degenerate_all_equal_and_zeros(shape):
  for value in (0.0, 1.0, -3.5):
    rows, cols = _check_against_scipy(np.full(shape, value, np.float32), atol=0.0)
    assert len(rows) == min(shape)


@pytest.mark.parametrize("shape", [(7, 7), (10, 4), (4, 10)])
def test_ties_small_integer_costs(shape):
  rng = np.random.default_rng(1)
  for _ in range(5):
    cost = rng.integers(0, 3, size=shape).astype(np.float32)  # many optimal assignments
    _check_against_scipy(cost, atol=0.0)  # integer costs: exact totals


def test_large_magnitudes():
  rng = np.random.default_rng(2)
  # Integers below 2**24 are exact in float32: totals must agree exactly.
  cost = rng.integers(-(10**6), 10**6, size=(12, 9)).astype(np.float32)
  _check_against_scipy(cost, atol=0.0, same_assignment=True)
  # Large offset: only the relative structure matters.
  cost = (1e6 + rng.normal(size=(9, 12)) * 1e3).astype(np.float32)
  _check_against_scipy(cost, same_assignment=True)


def test_known_assignment_and_negative_costs():
  cost = np.array([[4, 1, 3], [2, 0, 5], [3, 2, 2]], np.float32)  # SciPy docs example
  rows, cols = _check_against_scipy(cost, same_assignment=True)
  np.testing.assert_array_equal(cols, [1, 0, 2])
  _check_against_scipy(-cost, same_assignment=True)


@pytest.mark.parametrize("solver", ["jax", "scipy"])
@pytest.mark.parametrize("shape", [(6, 9), (9, 6)])
def test_vmap_over_batch(shape, solver):
  rng = np.random.default_rng(3)
  costs = rng.normal(size=(4,) + shape).astype(np.float32)
  rows, cols = jax.jit(jax.vmap(functools.partial(lsa, solver=solver)))(costs)
  for b in range(4):
    r0, c0 = scipy.optimize.linear_sum_assignment(costs[b])
    np.testing.assert_array_equal(np.asarray(rows[b]), r0)
    np.testing.assert_array_equal(np.asarray(cols[b]), c0)


@pytest.mark.parametrize("solver", ["jax", "scipy"])
def test_no_gradient_through_assignment(solver):
  rng = np.random.default_rng(4)
  cost = jnp.asarray(rng.normal(size=(5, 7)).astype(np.float32))

  def matched_cost(c):
    r, k = lsa(c, solver=solver)
    return c[r, k].sum()

  g = jax.jit(jax.grad(matched_cost))(cost)
  r, k = lsa(cost, solver=solver)
  want = np.zeros((5, 7), np.float32)
  want[np.asarray(r), np.asarray(k)] = 1.0
  np.testing.assert_array_equal(np.asarray(g), want)  # only the gather is differentiated
  g_idx = jax.grad(lambda c: lsa(c, solver=solver)[1].astype(jnp.float32).sum())(cost)
  np.testing.assert_array_equal(np.asarray(g_idx), 0.0)


@pytest.mark.parametrize("solver", ["jax", "scipy"])
def test_non_finite_policy(solver):
  rng = np.random.default_rng(5)
  cost = rng.normal(size=(6, 8)).astype(np.float32)
  cost[0, :7] = np.inf  # row 0 can only take column 7
  cost[1, 2] = np.nan
  cost[2, :] = np.nan
  cost[2, 5] = -1.0  # the only allowed entry of row 2
  rows, cols = (np.asarray(x) for x in _jitted(solver)(jnp.asarray(cost)))
  assert cols[0] == 7 and cols[2] == 5 and cols[1] != 2
  ref = np.where(np.isnan(cost), np.inf, cost)  # SciPy's meaning of forbidden entries
  r0, c0 = scipy.optimize.linear_sum_assignment(ref)
  np.testing.assert_allclose(cost[rows, cols].sum(), ref[r0, c0].sum(), rtol=1e-6)
  # -inf is preferred over everything finite.
  cost2 = rng.normal(size=(4, 4)).astype(np.float32)
  cost2[3, 1] = -np.inf
  assert np.asarray(_jitted(solver)(jnp.asarray(cost2))[1])[3] == 1
  # Nothing finite: still a valid assignment, no NaN, no hang.
  rows, cols = (np.asarray(x) for x in _jitted(solver)(jnp.full((3, 5), jnp.nan)))
  np.testing.assert_array_equal(rows, [0, 1, 2])
  assert len(set(cols.tolist())) == 3
  sane = np.asarray(matching.sanitize_cost(jnp.asarray(cost)))
  assert np.isfinite(sane).all()


def test_bad_input_errors_and_empty():
  with pytest.raises(ValueError, match="2-d"):
    lsa(jnp.zeros((3,)))
  with pytest.raises(ValueError, match="unknown solver"):
    lsa(jnp.zeros((3, 3)), solver="auction")
  rows, cols = jax.jit(lsa)(jnp.zeros((0, 4)))
  assert rows.shape == (0,) and cols.shape == (0,)
  rows, cols = jax.jit(lsa)(jnp.ones((3, 3), jnp.int32))  # ints are accepted
  assert rows.shape == (3,)


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
@hypothesis.given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    data=st.data(),
    integer=st.booleans())
def test_property_random_matrices(shape, data, integer):
  if integer:
    elements = st.integers(-4, 4).map(float)  # lots of ties
  else:
    elements = st.floats(-100, 100, allow_nan=False, width=32)
  cost = data.draw(hnp.arrays(np.float32, shape, elements=elements))
  _check_against_scipy(cost, "jax")


# ----------------------------------------------------------------------------- matcher


def _rand_boxes(rng, *shape):
  c = rng.uniform(0.2, 0.8, size=shape + (2,))
  wh = rng.uniform(0.05, 0.4, size=shape + (2,))
  return np.concatenate([c, wh], -1).astype(np.float32)


def _torch_dino_cost(logits, pred_boxes, tgt_boxes, w_class=2.0, w_bbox=5.0, w_giou=2.0,
                     labels=None):
  """DINO HungarianMatcher's cost of one image in float64 torch: [Q, T]."""
  logits = torch.tensor(logits, dtype=torch.float64)
  out_bbox = torch.tensor(pred_boxes, dtype=torch.float64)
  tgt_bbox = torch.tensor(tgt_boxes, dtype=torch.float64)
  tgt_ids = torch.zeros(len(tgt_bbox), dtype=torch.long) if labels is None else torch.tensor(labels)
  out_prob = logits.sigmoid()
  alpha, gamma = 0.25, 2.0
  neg = (1 - alpha) * (out_prob**gamma) * (-(1 - out_prob + 1e-8).log())
  pos = alpha * ((1 - out_prob)**gamma) * (-(out_prob + 1e-8).log())
  cost_class = pos[:, tgt_ids] - neg[:, tgt_ids]
  cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
  xyxy = functools.partial(torchvision.ops.box_convert, in_fmt="cxcywh", out_fmt="xyxy")
  cost_giou = -torchvision.ops.generalized_box_iou(xyxy(out_bbox), xyxy(tgt_bbox))
  return (w_bbox * cost_bbox + w_class * cost_class + w_giou * cost_giou).numpy()


def test_match_cost_equals_dino_reference(highest_precision):
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(2, 11, 1)).astype(np.float32) * 3
  pb, tb = _rand_boxes(rng, 2, 11), _rand_boxes(rng, 2, 5)
  cfg = matching.MatcherConfig(cost_class=1.5, cost_bbox=4.0, cost_giou=3.0)
  got = np.asarray(jax.jit(lambda *a: matching.match_cost(*a, config=cfg))(logits, pb, tb))
  for b in range(2):
    want = _torch_dino_cost(logits[b], pb[b], tb[b], 1.5, 4.0, 3.0)
    testing.assert_close_to_scale(got[b], want, 1e-5, "match cost")
  # Multi-class with labels (the general DINO form).
  logits3 = rng.normal(size=(2, 11, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 5))
  got = np.asarray(matching.match_cost(logits3, pb, tb, labels))
  for b in range(2):
    testing.assert_close_to_scale(got[b], _torch_dino_cost(logits3[b], pb[b], tb[b],
                                                           labels=labels[b]), 1e-5, "cost")


def _reference_match(logits, pb, tb, mask):
  """{target slot: query} from SciPy on the float64 DINO cost of the valid targets."""
  valid = np.flatnonzero(mask)
  if len(valid) == 0:
    return {}
  cost = _torch_dino_cost(logits, pb, tb[valid])
  qi, ti = scipy.optimize.linear_sum_assignment(cost)
  return {int(valid[t]): int(q) for q, t in zip(qi, ti)}


@pytest.mark.parametrize("solver", ["jax", "scipy"])
@pytest.mark.parametrize("q,t,masks", [
    (12, 5, [[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]),  # padded, empty, full
    (4, 7, [[1, 1, 1, 1, 1, 1, 0], [1, 0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]]),  # T > Q
])
def test_hungarian_match_padded_targets(q, t, masks, solver, highest_precision):
  rng = np.random.default_rng(q * t)
  b = len(masks)
  mask = np.asarray(masks, bool)
  logits = rng.normal(size=(b, q, 1)).astype(np.float32)
  pb = _rand_boxes(rng, b, q)
  tb = _rand_boxes(rng, b, t)
  tb_garbage = np.where(mask[..., None], tb, np.float32(np.nan))  # padding may hold anything
  cfg = matching.MatcherConfig(solver=solver)
  m = jax.jit(lambda *a: matching.hungarian_match(*a, config=cfg))(logits, pb, tb_garbage, mask)
  pred_idx, tgt_idx, valid = (np.asarray(x) for x in m)
  assert pred_idx.shape == tgt_idx.shape == valid.shape == (b, t)
  np.testing.assert_array_equal(tgt_idx, np.broadcast_to(np.arange(t), (b, t)))
  for i in range(b):
    want = _reference_match(logits[i], pb[i], tb[i], mask[i])
    got = {int(s): int(pred_idx[i, s]) for s in np.flatnonzero(valid[i])}
    assert got == want, f"image {i}: {got} != {want}"
    assert not np.any(valid[i] & ~mask[i]), "a padded target was matched"
  matched, target = (np.asarray(x) for x in matching.query_targets(m, q))
  for i in range(b):
    assert matched[i].sum() == valid[i].sum()  # matched queries are distinct
    for s in np.flatnonzero(valid[i]):
      assert matched[i, pred_idx[i, s]] and target[i, pred_idx[i, s]] == s


def test_hungarian_match_vmaps_and_has_no_gradient():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(3, 2, 6, 1)).astype(np.float32)  # [layers, B, Q, 1]
  pb = _rand_boxes(rng, 3, 2, 6)
  tb = _rand_boxes(rng, 2, 3)
  mask = np.array([[1, 1, 0], [1, 0, 1]], bool)
  m = jax.jit(jax.vmap(matching.hungarian_match, in_axes=(0, 0, None, None)))(logits, pb, tb, mask)
  one = jax.jit(matching.hungarian_match)
  for layer in range(3):
    single = one(logits[layer], pb[layer], tb, mask)
    np.testing.assert_array_equal(np.asarray(m.pred_idx[layer]), np.asarray(single.pred_idx))

  def f(lg, bx):
    return matching.hungarian_match(lg, bx, tb, mask).pred_idx.astype(jnp.float32).sum()

  g = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(logits[0]), jnp.asarray(pb[0]))
  assert all(np.all(np.asarray(x) == 0) for x in g)


def test_hungarian_match_bad_shapes():
  with pytest.raises(ValueError, match="pred_boxes"):
    matching.hungarian_match(jnp.zeros((1, 4, 1)), jnp.zeros((1, 4, 3)), jnp.zeros((1, 2, 4)),
                             jnp.ones((1, 2), bool))
  with pytest.raises(ValueError, match="mask"):
    matching.hungarian_match(jnp.zeros((1, 4, 1)), jnp.zeros((1, 4, 4)), jnp.zeros((1, 2, 4)),
                             jnp.ones((1, 3), bool))
  with pytest.raises(ValueError, match="unknown matcher config"):
    matching.MatcherConfig.from_dict({"cost_clas": 1.0})


@hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
@hypothesis.given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    data=st.data())
def test_property_forbidden_entries(shape, data):
  """+inf entries: when SciPy finds a feasible assignment, ours has the same finite total."""
  elements = st.one_of(st.floats(-10, 10, allow_nan=False, width=32), st.just(np.inf))
  cost = data.draw(hnp.arrays(np.float32, shape, elements=elements))
  rows, cols = (np.asarray(x) for x in _jitted("jax")(jnp.asarray(cost)))
  assert np.all(np.diff(rows) > 0) and len(set(cols.tolist())) == min(shape)
  try:
    r0, c0 = scipy.optimize.linear_sum_assignment(cost.astype(np.float64))
  except ValueError:  # infeasible: every assignment uses a forbidden entry
    assert not np.isfinite(cost[rows, cols]).all()
    return
  assert np.isfinite(cost[rows, cols]).all()
  np.testing.assert_allclose(cost[rows, cols].astype(np.float64).sum(),
                             cost[r0, c0].astype(np.float64).sum(), atol=1e-4)
