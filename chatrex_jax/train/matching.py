"""Linear sum assignment in pure JAX and the DINO/DETR Hungarian matcher for UPN.

Two pieces:

* `linear_sum_assignment(cost, solver="jax"|"scipy") -> (rows, cols)`: SciPy's contract
  (`scipy.optimize.linear_sum_assignment`): a 2-d cost [N, M] (rectangular allowed), returns
  `K = min(N, M)` pairs as two int32 vectors [K], `rows` ascending, minimising
  `cost[rows, cols].sum()`. The default solver is an exact shortest-augmenting-path
  Hungarian algorithm (Jonker-Volgenant style, with dual potentials) written with
  a vectorised greedy start (row reduction), then `lax.while_loop`s over the
  rows left, over the augmenting-path search and over the augmentation, with vectorised
  column updates: it is jit-able for a static shape, runs on TPU/GPU without a
  host round trip and vmaps over a batch. `solver="scipy"` calls SciPy through
  `jax.pure_callback` (host round trip; also jit-able and vmappable). Both return integer
  indices and stop gradients at the cost, so nothing is differentiated through the
  assignment (differentiate the cost gathered at the returned indices instead).

* `hungarian_match(...)`: DINO's `HungarianMatcher` over padded targets, vectorised over the
  batch (see its docstring for the output layout).

Non-finite costs (documented policy, identical for both solvers): entries that are NaN or
+inf mean "forbidden" and are replaced by a finite `hi` larger than any total that avoids
them: `hi = max_f + (K + 1) * (max_f - min_f) + 1` where `max_f` / `min_f` are the largest /
smallest finite entries. -inf entries mean "preferred" and become
`lo = min_f - (K + 1) * (max_f - min_f) - 1`. An optimal assignment therefore uses as few
forbidden (and as many preferred) entries as possible, then minimises the finite cost.
Unlike SciPy (which raises on NaN / -inf and on infeasible matrices) this never raises
inside `jit`: an infeasible matrix still yields K pairs, some of them on forbidden entries;
callers that care check `jnp.isfinite(cost[rows, cols])`. All-non-finite matrices become
all-zero. Note that the replacement widens the dynamic range, so in float32 huge finite
ranges combined with forbidden entries lose precision; in float64 (jax x64) the solver
computes in float64.

Precision: the JAX solver works in the cost's dtype (float32 unless x64 is enabled), SciPy
in float64. Assignments agree whenever the optimum is unique up to float32 resolution;
with (near-)ties both return an optimal assignment, possibly a different one.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from chatrex_jax.ops import boxes as box_ops

_SOLVERS = ("jax", "scipy")


# ----------------------------------------------------------------------------- solver


def sanitize_cost(cost: jax.Array) -> jax.Array:
  """Replaces NaN/+inf by a large finite 'forbidden' value and -inf by a very small one.

  Args:
    cost: [N, M] floating array.
  Returns:
    [N, M] finite array of the same dtype (see the module docstring for the values).
  """
  finite = jnp.isfinite(cost)
  any_finite = jnp.any(finite)
  max_f = jnp.where(any_finite, jnp.max(jnp.where(finite, cost, -jnp.inf)), 0.0)
  min_f = jnp.where(any_finite, jnp.min(jnp.where(finite, cost, jnp.inf)), 0.0)
  k = min(cost.shape)
  span = (k + 1) * (max_f - min_f) + 1
  hi = (max_f + span).astype(cost.dtype)
  lo = (min_f - span).astype(cost.dtype)
  out = jnp.where(jnp.isneginf(cost), lo, jnp.where(finite, cost, hi))
  return jnp.where(any_finite, out, jnp.zeros_like(cost))


def _solve_wide(c: jax.Array, active: jax.Array | None = None) -> jax.Array:
  """Exact min-cost assignment of every (active) row of a finite cost [n, m], n <= m.

  Shortest augmenting path with dual potentials (the O(n^2 m) Hungarian algorithm in its
  Jonker-Volgenant form). Arrays carry a dummy index 0 (rows and columns are 1-based inside):
  `p[j]` is the row assigned to column j (0 = free), `way[j]` the previous column on the
  shortest path tree, `u` / `v` the row / column potentials, `minv[j]` the tentative
  reduced distance to column j.

  Args:
    c: [n, m] finite float cost, n <= m.
    active: optional [n] bool; inactive rows are left out of the problem entirely (their
      output entry is meaningless) -- the matcher uses it for padded targets.
  Returns:
    int32 [n]: the column assigned to each row.
  """
  n, m = c.shape
  if active is None:
    active = jnp.ones((n,), bool)
  dtype = c.dtype
  big = jnp.array(jnp.inf, dtype)
  a = jnp.zeros((n + 1, m + 1), dtype).at[1:, 1:].set(c)
  cols = jnp.arange(m + 1, dtype=jnp.int32)

  def add_row(i, carry):
    u, v, p, way = carry
    p = p.at[0].set(i)
    minv = jnp.full((m + 1,), big)
    used = jnp.zeros((m + 1,), bool)

    # Dijkstra on reduced costs until a free column (p == 0) is reached; each step marks one
    # new column as used, so this terminates within m steps whatever the rounding.
    def search_cond(s):
      _, _, p, _, _, _, j0 = s
      return p[j0] != 0

    def search_body(s):
      u, v, p, way, minv, used, j0 = s
      used = used.at[j0].set(True)
      i0 = p[j0]
      cur = a[i0] - u[i0] - v
      better = (~used) & (cur < minv)
      minv = jnp.where(better, cur, minv)
      way = jnp.where(better, j0, way)
      masked = jnp.where(used, big, minv)
      j1 = jnp.argmin(masked).astype(jnp.int32)
      delta = masked[j1]
      # Rows reached so far are exactly p[used]; they are distinct, other entries add 0.
      u = u.at[p].add(jnp.where(used, delta, 0).astype(dtype))
      v = jnp.where(used, v - delta, v)
      minv = jnp.where(used, minv, minv - delta)
      return u, v, p, way, minv, used, j1

    u, v, p, way, _, _, j0 = lax.while_loop(
        search_cond, search_body, (u, v, p, way, minv, used, jnp.int32(0)))

    # Augment along the path back to the dummy column 0.
    def aug_cond(s):
      return s[1] != 0

    def aug_body(s):
      p, j0 = s
      j1 = way[j0]
      return p.at[j0].set(p[j1]), j1

    p, _ = lax.while_loop(aug_cond, aug_body, (p, j0))
    return u, v, p, way

  # Greedy start (JV's row reduction): u_i = min_j c_ij, v = 0 is a feasible dual, and each
  # row whose arg-min column is not claimed by an earlier row takes it (a tight edge). Only
  # the remaining rows run the augmenting-path search; for DETR-shaped costs (few targets,
  # many queries) that is a handful of rows.
  row_min = jnp.min(c, axis=1)
  best = jnp.argmin(c, axis=1).astype(jnp.int32)
  rows = jnp.arange(n, dtype=jnp.int32)
  first = jnp.full((m,), n, jnp.int32).at[best].min(jnp.where(active, rows, n))
  won = (first[best] == rows) & active
  p0 = jnp.zeros((m + 1,), jnp.int32).at[jnp.where(won, best + 1, m + 1)].set(
      rows + 1, mode="drop")
  pending = active & ~won
  todo = jnp.argsort(~pending, stable=True).astype(jnp.int32) + 1  # pending first, 1-based
  n_todo = jnp.sum(pending)

  def todo_body(s):
    k, carry = s
    return k + 1, add_row(todo[k], carry)

  init = (jnp.concatenate([jnp.zeros((1,), dtype), row_min]), jnp.zeros((m + 1,), dtype),
          p0, jnp.zeros((m + 1,), jnp.int32))
  _, (_, _, p, _) = lax.while_loop(lambda s: s[0] < n_todo, todo_body, (jnp.int32(0), init))
  # Invert p (column -> row) into row -> column; free columns (p == 0) are dropped.
  row_of_col = jnp.where(p[1:] > 0, p[1:] - 1, n)
  return jnp.zeros((n,), jnp.int32).at[row_of_col].set(cols[1:] - 1, mode="drop")


@jax.jit
def _lsa_jax(cost: jax.Array) -> tuple[jax.Array, jax.Array]:
  n, m = cost.shape
  if n <= m:
    return jnp.arange(n, dtype=jnp.int32), _solve_wide(cost)
  # Tall: solve the transpose (every column gets a row), then sort the pairs by row.
  row_of_col = _solve_wide(cost.T)
  order = jnp.argsort(row_of_col).astype(jnp.int32)
  return row_of_col[order], order


def _scipy_host(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  from scipy.optimize import linear_sum_assignment as scipy_lsa
  rows, cols = scipy_lsa(np.asarray(cost, np.float64))
  return rows.astype(np.int32), cols.astype(np.int32)


def _lsa_scipy(cost: jax.Array) -> tuple[jax.Array, jax.Array]:
  k = min(cost.shape)
  shapes = (jax.ShapeDtypeStruct((k,), jnp.int32), jax.ShapeDtypeStruct((k,), jnp.int32))
  return jax.pure_callback(_scipy_host, shapes, cost, vmap_method="sequential")


def linear_sum_assignment(cost: jax.Array, solver: str = "jax") -> tuple[jax.Array, jax.Array]:
  """Minimum-cost assignment with `scipy.optimize.linear_sum_assignment`'s contract.

  Args:
    cost: [N, M] real array (any float dtype; ints are cast to float32). Rectangular allowed.
      Non-finite entries follow the module's policy (NaN/+inf forbidden, -inf preferred).
    solver: "jax" (pure JAX, exact, on device) or "scipy" (host callback).
  Returns:
    (rows, cols): int32 [K], K = min(N, M); rows strictly ascending (for N <= M it is
    arange(N)); `cost[rows, cols].sum()` is minimal. No gradient flows through them.
  """
  cost = jnp.asarray(cost)
  if cost.ndim != 2:
    raise ValueError(f"linear_sum_assignment expects a 2-d cost matrix, got shape {cost.shape}")
  if solver not in _SOLVERS:
    raise ValueError(f"unknown solver {solver!r}; expected one of {_SOLVERS}")
  if not jnp.issubdtype(cost.dtype, jnp.floating):
    cost = cost.astype(jnp.float32)
  n, m = cost.shape
  if n == 0 or m == 0:
    empty = jnp.zeros((0,), jnp.int32)
    return empty, empty
  cost = sanitize_cost(lax.stop_gradient(cost))
  return _lsa_jax(cost) if solver == "jax" else _lsa_scipy(cost)


# ----------------------------------------------------------------------------- matcher


@dataclasses.dataclass(frozen=True)
class MatcherConfig:
  """DINO `HungarianMatcher` settings (DINO's `set_cost_*` defaults).

  cost_class: weight of the focal-style class cost. cost_bbox: weight of the L1 distance of
  normalised cxcywh boxes. cost_giou: weight of -GIoU (xyxy). focal_alpha / focal_gamma:
  the class cost's focal parameters. solver: "jax" or "scipy" (see linear_sum_assignment).
  """
  cost_class: float = 2.0
  cost_bbox: float = 5.0
  cost_giou: float = 2.0
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  solver: str = "jax"

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None) -> "MatcherConfig":
    d = dict(d or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown matcher config keys {unknown}; known: {sorted(names)}")
    return cls(**d)


class Match(NamedTuple):
  """Matching of one batch, indexed by target slot (all int32/bool [B, T]).

  pred_idx[b, t]: the query matched to target slot t (0 where `valid` is False).
  tgt_idx[b, t]:  = t (DETR's (src, tgt) index pairs, kept for readability).
  valid[b, t]:    target t is a real (unpadded) target and has a query (always true for a
                  real target when T_valid <= Q; with more real targets than queries the
                  Q best are matched).
  Use `query_targets(match, num_queries)` for the per-query view.
  """
  pred_idx: jax.Array
  tgt_idx: jax.Array
  valid: jax.Array


def query_targets(match: Match, num_queries: int) -> tuple[jax.Array, jax.Array]:
  """Per-query view of a `Match`.

  Returns:
    (matched [B, Q] bool, target [B, Q] int32: the target slot of each matched query, 0 else).
  """
  b, t = match.pred_idx.shape
  # Unmatched slots scatter to the out-of-range index Q and are dropped.
  idx = jnp.where(match.valid, match.pred_idx, num_queries)
  bidx = jnp.arange(b)[:, None]
  matched = jnp.zeros((b, num_queries), bool).at[bidx, idx].set(True, mode="drop")
  target = jnp.zeros((b, num_queries), jnp.int32).at[bidx, idx].set(
      jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), mode="drop")
  return matched, target


def focal_class_cost(logits: jax.Array, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
  """DINO's focal-style class cost per (query, class): pos_cost - neg_cost.

  Args: logits [..., C] (pre-sigmoid). Returns [..., C] float32.
  """
  prob = jax.nn.sigmoid(logits.astype(jnp.float32))
  neg = (1 - alpha) * prob**gamma * -jnp.log(1 - prob + 1e-8)
  pos = alpha * (1 - prob)**gamma * -jnp.log(prob + 1e-8)
  return pos - neg


_SAFE_BOX = (0.5, 0.5, 1.0, 1.0)


def safe_boxes(boxes: jax.Array, mask: jax.Array) -> jax.Array:
  """Replaces padded boxes [..., T, 4] (mask [..., T] False) by a unit box so IoU stays finite."""
  return jnp.where(mask[..., None], boxes, jnp.asarray(_SAFE_BOX, boxes.dtype))


def match_cost(pred_logits: jax.Array, pred_boxes: jax.Array, tgt_boxes: jax.Array,
               tgt_labels: jax.Array | None = None,
               config: MatcherConfig = MatcherConfig()) -> jax.Array:
  """DINO's matching cost of one image (also works batched with leading dims).

  Args:
    pred_logits: [..., Q, C] pre-sigmoid class logits (C = 1 for UPN's binary prompts).
    pred_boxes: [..., Q, 4] normalised cxcywh.
    tgt_boxes: [..., T, 4] normalised cxcywh (must be proper boxes: w, h > 0).
    tgt_labels: [..., T] int class ids in [0, C); None means all 0 (UPN).
    config: cost weights.
  Returns:
    [..., Q, T] float32 cost = w_class*(pos-neg focal cost at the target class)
      + w_bbox*L1(cxcywh) + w_giou*(-GIoU(xyxy)).
  """
  pred_boxes = pred_boxes.astype(jnp.float32)
  tgt_boxes = tgt_boxes.astype(jnp.float32)
  cls = focal_class_cost(pred_logits, config.focal_alpha, config.focal_gamma)  # [..., Q, C]
  if tgt_labels is None:
    cost_class = jnp.broadcast_to(cls[..., :1], cls.shape[:-1] + (tgt_boxes.shape[-2],))
  else:
    idx = jnp.broadcast_to(tgt_labels[..., None, :], cls.shape[:-1] + tgt_labels.shape[-1:])
    cost_class = jnp.take_along_axis(cls, idx.astype(jnp.int32), axis=-1)
  cost_bbox = jnp.abs(pred_boxes[..., :, None, :] - tgt_boxes[..., None, :, :]).sum(-1)
  cost_giou = -box_ops.pairwise_giou(box_ops.cxcywh_to_xyxy(pred_boxes),
                                     box_ops.cxcywh_to_xyxy(tgt_boxes))
  return config.cost_bbox * cost_bbox + config.cost_class * cost_class + config.cost_giou * cost_giou


def _check_shapes(pred_logits, pred_boxes, tgt_boxes, tgt_mask):
  if pred_logits.ndim != 3 or pred_boxes.ndim != 3 or pred_boxes.shape[-1] != 4:
    raise ValueError("expected pred_logits [B, Q, C] and pred_boxes [B, Q, 4], got "
                     f"{pred_logits.shape} and {pred_boxes.shape}")
  if pred_logits.shape[:2] != pred_boxes.shape[:2]:
    raise ValueError(f"pred_logits {pred_logits.shape} and pred_boxes {pred_boxes.shape} "
                     "disagree on [B, Q]")
  if tgt_boxes.ndim != 3 or tgt_boxes.shape[-1] != 4 or tgt_mask.shape != tgt_boxes.shape[:2]:
    raise ValueError("expected target boxes [B, T, 4] and mask [B, T], got "
                     f"{tgt_boxes.shape} and {tgt_mask.shape}")
  if tgt_boxes.shape[0] != pred_boxes.shape[0]:
    raise ValueError(f"batch sizes differ: predictions {pred_boxes.shape[0]}, "
                     f"targets {tgt_boxes.shape[0]}")


def assign_padded(cost: jax.Array, tgt_mask: jax.Array, solver: str = "jax") -> Match:
  """Optimal assignment of queries to the valid targets of each image.

  Padded targets never win a real pair. When T <= Q the JAX solver leaves padded target
  rows out of the problem (no search is spent on them) and the SciPy solver sees them as a
  constant-cost row (0), which only takes left-over queries and cannot change the optimum
  over the real targets. When T > Q padded targets get a 'forbidden' cost (NaN, see the
  module policy), so real targets are always preferred. Either way `valid` is False for them.
  Non-finite costs of real pairs follow the module policy.

  Args:
    cost: [B, Q, T] float cost (finite for valid targets).
    tgt_mask: [B, T] bool.
    solver: "jax" or "scipy".
  Returns:
    Match with [B, T] fields.
  """
  b, q, t = cost.shape
  cost = lax.stop_gradient(cost.astype(jnp.float32))
  tgt_mask = tgt_mask.astype(bool)
  pad_value = 0.0 if t <= q else jnp.nan
  cost = jnp.where(tgt_mask[:, None, :], cost, pad_value)
  solve = functools.partial(linear_sum_assignment, solver=solver)
  if t <= q:
    # Targets as rows: each slot gets a query, rows == arange(T).
    cost_tq = jnp.swapaxes(cost, 1, 2)
    if solver == "jax":
      pred_idx = jax.vmap(lambda c, a: _solve_wide(sanitize_cost(c), a))(cost_tq, tgt_mask)
    else:
      _, pred_idx = jax.vmap(solve)(cost_tq)
    valid = tgt_mask
  else:
    # Queries as rows: every query gets a target slot; scatter into target-slot order.
    q_rows, t_cols = jax.vmap(solve)(cost)  # [B, Q] each
    bidx = jnp.arange(b)[:, None]
    pred_idx = jnp.zeros((b, t), jnp.int32).at[bidx, t_cols].set(q_rows)
    has = jnp.zeros((b, t), bool).at[bidx, t_cols].set(True)
    valid = tgt_mask & has
  pred_idx = jnp.where(valid, pred_idx, 0).astype(jnp.int32)
  tgt_idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return Match(pred_idx, tgt_idx, valid)


@functools.partial(jax.jit, static_argnames=("config",))
def hungarian_match(pred_logits: jax.Array, pred_boxes: jax.Array, tgt_boxes: jax.Array,
                    tgt_mask: jax.Array, tgt_labels: jax.Array | None = None,
                    config: MatcherConfig = MatcherConfig()) -> Match:
  """DINO `HungarianMatcher` (focal class cost) over a padded batch; jit-able, no gradient.

  Args:
    pred_logits: [B, Q, C] pre-sigmoid logits (C = 1 for UPN: one binary problem per prompt).
    pred_boxes: [B, Q, 4] normalised cxcywh.
    tgt_boxes: [B, T, 4] normalised cxcywh; padded rows may hold anything (even NaN).
    tgt_mask: [B, T] bool, True for real targets.
    tgt_labels: [B, T] int class ids or None (= 0, UPN).
    config: MatcherConfig.
  Returns:
    Match (pred_idx, tgt_idx, valid), each [B, T]: real target t of image b is matched to
    query pred_idx[b, t] iff valid[b, t]. Matched queries are distinct within an image.
  """
  pred_logits = jnp.asarray(pred_logits)
  pred_boxes = jnp.asarray(pred_boxes)
  tgt_boxes = jnp.asarray(tgt_boxes)
  tgt_mask = jnp.asarray(tgt_mask).astype(bool)
  _check_shapes(pred_logits, pred_boxes, tgt_boxes, tgt_mask)
  args = [lax.stop_gradient(x) for x in (pred_logits, pred_boxes, tgt_boxes)]
  safe = safe_boxes(args[2].astype(jnp.float32), tgt_mask)
  labels = None
  if tgt_labels is not None:
    labels = jnp.where(tgt_mask, jnp.asarray(tgt_labels), 0)
  cost = match_cost(args[0], args[1], safe, labels, config)
  return assign_padded(cost, tgt_mask, config.solver)
