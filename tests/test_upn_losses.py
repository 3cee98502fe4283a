"""UPN losses against DINO's SetCriterion definitions, computed here in float64 torch.

The reference uses torchvision.ops.sigmoid_focal_loss / generalized_box_iou_loss with DINO's
reductions (focal: mean over queries, sum, / num_boxes, times Q; L1 and GIoU: sum / num_boxes)
and DINO's HungarianMatcher (focal cost + L1 + GIoU, SciPy) for each layer.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
import torchvision

from chatrex_jax import testing
from chatrex_jax.train import matching, upn_losses

TOL = 1e-5  # docs/architecture.md "Numeric tolerances": fp32 ops, max abs error <= 1e-5 of the output scale
XYXY = functools.partial(torchvision.ops.box_convert, in_fmt="cxcywh", out_fmt="xyxy")


def _rand_boxes(rng, *shape):
  c = rng.uniform(0.2, 0.8, size=shape + (2,))
  wh = rng.uniform(0.05, 0.4, size=shape + (2,))
  return np.concatenate([c, wh], -1).astype(np.float32)


# ----------------------------------------------------------------------------- reference


def _ref_focal(logits, onehot, num_boxes):
  """DINO: sigmoid_focal_loss(...) = loss.mean(1).sum() / num_boxes, then * Q in loss_labels."""
  loss = torchvision.ops.sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2.0, reduction="none")
  return loss.mean(1).sum() / num_boxes * logits.shape[1]


def _ref_match(logits, boxes, tgt, w=(2.0, 5.0, 2.0)):
  """DINO HungarianMatcher for one image (UPN: one class). Returns (query idx, target idx)."""
  if len(tgt) == 0:
    return np.zeros(0, int), np.zeros(0, int)
  prob = logits.sigmoid()[:, :1]
  neg = 0.75 * prob**2 * -(1 - prob + 1e-8).log()
  pos = 0.25 * (1 - prob)**2 * -(prob + 1e-8).log()
  cost = (w[1] * torch.cdist(boxes, tgt, p=1) + w[0] * (pos - neg)
          - w[2] * torchvision.ops.generalized_box_iou(XYXY(boxes), XYXY(tgt)))
  return scipy.optimize.linear_sum_assignment(cost.numpy())


def _ref_layer(logits, boxes, tgt_list, num_boxes, w=(2.0, 5.0, 2.0)):
  """DINO SetCriterion loss_labels + loss_boxes for one layer. logits [B, Q, 1] float64."""
  b, q, _ = logits.shape
  onehot = torch.zeros_like(logits)
  src, dst = [], []
  for i in range(b):
    qi, ti = _ref_match(logits[i], boxes[i], tgt_list[i], w)
    onehot[i, qi, 0] = 1.0
    src.append(boxes[i][qi])
    dst.append(tgt_list[i][ti])
  src, dst = torch.cat(src), torch.cat(dst)
  return {
      "loss_ce": _ref_focal(logits, onehot, num_boxes),
      "loss_bbox": F.l1_loss(src, dst, reduction="none").sum() / num_boxes,
      "loss_giou": torchvision.ops.generalized_box_iou_loss(XYXY(src), XYXY(dst),
                                                            reduction="sum") / num_boxes,
  }


def _ref_criterion(outputs, tgt_boxes, tgt_mask, weights=(1.0, 5.0, 2.0)):
  """All losses with DINO names and the weighted total, in float64 torch."""
  t64 = lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)  # noqa: E731
  tgt_list = [t64(tgt_boxes[i][tgt_mask[i]]) for i in range(len(tgt_mask))]
  num_boxes = max(float(tgt_mask.sum()), 1.0)
  losses = {}
  layers = [(o, f"_{i}") for i, o in enumerate(outputs.get("aux_outputs", []))]
  layers.append((outputs, ""))
  if "interm_outputs" in outputs:
    layers.append((outputs["interm_outputs"], "_interm"))
  for out, suffix in layers:
    for k, v in _ref_layer(t64(out["pred_logits"]), t64(out["pred_boxes"]), tgt_list,
                           num_boxes).items():
      losses[k + suffix] = float(v)
  w = dict(zip(upn_losses.LOSS_NAMES, weights))
  total = sum(w[k.split("_")[0] + "_" + k.split("_")[1]] * v for k, v in losses.items())
  return total, losses


def _outputs(rng, b, q, n_aux=2, interm=True, q_interm=None):
  def layer(nq):
    return {"pred_logits": (rng.normal(size=(b, nq, 1)) * 2).astype(np.float32),
            "pred_boxes": _rand_boxes(rng, b, nq)}
  out = layer(q)
  out["aux_outputs"] = [layer(q) for _ in range(n_aux)]
  if interm:
    out["interm_outputs"] = layer(q_interm or q)
  return out


# ----------------------------------------------------------------------------- tests


def test_sigmoid_focal_loss_equals_torchvision():
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(3, 7, 2)) * 4).astype(np.float32)
  targets = (rng.random((3, 7, 2)) < 0.3).astype(np.float32)
  got = jax.jit(upn_losses.sigmoid_focal_loss)(logits, targets, 5.0)
  loss = torchvision.ops.sigmoid_focal_loss(torch.tensor(logits, dtype=torch.float64),
                                            torch.tensor(targets, dtype=torch.float64),
                                            alpha=0.25, gamma=2.0, reduction="none")
  want = loss.mean(1).sum() / 5.0
  testing.assert_close_to_scale(got, want.numpy(), TOL, "focal")
  # alpha < 0 switches the alpha weighting off (torchvision: same convention).
  got = upn_losses.sigmoid_focal_loss(logits, targets, 1.0, alpha=-1.0)
  want = torchvision.ops.sigmoid_focal_loss(torch.tensor(logits, dtype=torch.float64),
                                            torch.tensor(targets, dtype=torch.float64),
                                            alpha=-1, reduction="none").mean(1).sum()
  testing.assert_close_to_scale(got, want.numpy(), TOL, "focal alpha<0")
  # Extreme logits stay finite (stable BCE form).
  assert np.isfinite(float(upn_losses.sigmoid_focal_loss(
      np.array([[[80.0], [-80.0]]], np.float32), np.array([[[0.0], [1.0]]], np.float32), 1.0)))


def test_set_losses_given_match_equal_hand_computed():
  """Fixed matching: loss_ce / loss_bbox / loss_giou by the DETR definitions."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 1)).astype(np.float32)
  pb = _rand_boxes(rng, 2, 5)
  tb = _rand_boxes(rng, 2, 3)
  mask = np.array([[1, 1, 0], [0, 1, 1]], bool)
  match = matching.Match(pred_idx=jnp.array([[4, 0, 0], [0, 2, 1]], jnp.int32),
                         tgt_idx=jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (2, 3)),
                         valid=jnp.asarray(mask))
  got = jax.jit(upn_losses.set_losses)(logits, pb, tb, mask, match, 4.0)
  pairs = [(0, 4, 0), (0, 0, 1), (1, 2, 1), (1, 1, 2)]  # (image, query, target)
  onehot = np.zeros((2, 5, 1))
  for i, q, _ in pairs:
    onehot[i, q, 0] = 1
  t64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
  logits_t = t64(logits).requires_grad_()
  pb_t = t64(pb).requires_grad_()
  src = torch.stack([pb_t[i, q] for i, q, _ in pairs])
  dst = t64(np.stack([tb[i, t] for i, _, t in pairs]))
  want = {
      "loss_ce": _ref_focal(logits_t, t64(onehot), 4.0),
      "loss_bbox": (src - dst).abs().sum() / 4.0,
      "loss_giou": torchvision.ops.generalized_box_iou_loss(XYXY(src), XYXY(dst),
                                                            reduction="sum") / 4.0,
  }
  for k in want:
    testing.assert_close_to_scale(got[k], want[k].detach().numpy(), TOL, k)
  # Gradients of the DINO-weighted sum agree with torch autograd.
  (1.0 * want["loss_ce"] + 5.0 * want["loss_bbox"] + 2.0 * want["loss_giou"]).backward()

  def weighted(lg, bx):
    d = upn_losses.set_losses(lg, bx, tb, mask, match, 4.0)
    return d["loss_ce"] + 5.0 * d["loss_bbox"] + 2.0 * d["loss_giou"]

  g_lg, g_bx = jax.jit(jax.grad(weighted, argnums=(0, 1)))(logits, pb)
  testing.assert_close_to_scale(g_lg, logits_t.grad.numpy(), TOL, "d/dlogits")
  testing.assert_close_to_scale(g_bx, pb_t.grad.numpy(), TOL, "d/dboxes")


@pytest.mark.parametrize("solver", ["jax", "scipy"])
def test_criterion_equals_dino_reference(solver, highest_precision):
  rng = np.random.default_rng(2)
  b, q, t = 3, 9, 4
  outputs = _outputs(rng, b, q, n_aux=2, q_interm=7)
  tb = _rand_boxes(rng, b, t)
  mask = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]], bool)  # image 1: no targets
  cfg = {"matcher": {"solver": solver}}
  total, losses = jax.jit(lambda o, tg: upn_losses.upn_criterion(o, tg, config=cfg))(
      outputs, {"boxes": tb, "mask": mask})
  want_total, want = _ref_criterion(outputs, tb, mask)
  assert sorted(losses) == sorted(want)
  assert len(want) == 12  # 3 losses x (final + 2 aux + interm)
  for k in want:
    testing.assert_close_to_scale(losses[k], np.float64(want[k]), TOL, k)
  testing.assert_close_to_scale(total, np.float64(want_total), TOL, "total")


def test_weights_from_config_and_stacked_aux():
  rng = np.random.default_rng(3)
  outputs = _outputs(rng, 2, 6, n_aux=2)
  targets = {"boxes": _rand_boxes(rng, 2, 3), "mask": np.array([[1, 1, 0], [1, 0, 0]], bool)}
  cfg = {"cls_weight": 2.0, "bbox_weight": 3.0, "giou_weight": 0.5, "interm_loss_weight": 0.1}
  crit = jax.jit(lambda o: upn_losses.upn_criterion(o, targets, config=cfg))
  total, losses = crit(outputs)
  w = {"loss_ce": 2.0, "loss_bbox": 3.0, "loss_giou": 0.5}
  want = sum(w["_".join(k.split("_")[:2])] * (0.1 if k.endswith("interm") else 1.0) * float(v)
             for k, v in losses.items())
  np.testing.assert_allclose(float(total), want, rtol=1e-6)
  # DINO's list of aux dicts == one mapping of stacked [L-1, B, Q, ...] arrays.
  stacked = dict(outputs)
  stacked["aux_outputs"] = {k: np.stack([a[k] for a in outputs["aux_outputs"]])
                            for k in ("pred_logits", "pred_boxes")}
  total2, losses2 = crit(stacked)
  assert float(total2) == float(total)
  # aux_loss False drops the auxiliary layers; interm_box_loss False zeroes its box weights.
  _, only_final = jax.jit(lambda o: upn_losses.upn_criterion(
      o, targets, config={"aux_loss": False}))(outputs)
  assert "loss_ce_0" not in only_final and "loss_ce_interm" in only_final
  t3, l3 = jax.jit(lambda o: upn_losses.upn_criterion(
      o, targets, config={"interm_box_loss": False}))(outputs)
  want3 = sum({"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}["_".join(k.split("_")[:2])]
              * float(v) for k, v in l3.items()
              if not (k.endswith("interm") and not k.startswith("loss_ce")))
  np.testing.assert_allclose(float(t3), want3, rtol=1e-6)
  with pytest.raises(ValueError, match="unknown UPN loss config"):
    upn_losses.UPNLossConfig.from_dict({"bbox_wieght": 1.0})
  with pytest.raises(KeyError, match="mask"):
    upn_losses.upn_criterion(outputs, {"boxes": targets["boxes"]})


def test_padded_targets_ignored_and_gradients_finite():
  rng = np.random.default_rng(4)
  outputs = _outputs(rng, 2, 8, n_aux=1)
  tb = _rand_boxes(rng, 2, 3)
  mask = np.array([[1, 1, 1], [0, 0, 0]], bool)  # image 1 has zero targets
  # The same targets padded to T = 6 with garbage (NaN, degenerate, huge) in the padding.
  tb_pad = np.concatenate([tb, np.full((2, 3, 4), np.nan, np.float32)], 1)
  tb_pad[0, 4] = 0.0
  tb_pad[1, 5] = [5.0, -3.0, 1e6, 0.0]
  mask_pad = np.concatenate([mask, np.zeros((2, 3), bool)], 1)

  @jax.jit
  def loss(o, tbx, m):
    return upn_losses.upn_criterion(o, {"boxes": tbx, "mask": m})

  vg = jax.jit(jax.value_and_grad(lambda o, tbx, m: loss(o, tbx, m)[0]))
  (total, grads) = vg(outputs, tb, mask)
  (total_pad, grads_pad) = vg(outputs, tb_pad, mask_pad)
  np.testing.assert_allclose(float(total_pad), float(total), rtol=1e-6)
  for g, gp in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_pad)):
    assert np.isfinite(np.asarray(g)).all() and np.isfinite(np.asarray(gp)).all()
    np.testing.assert_allclose(np.asarray(gp), np.asarray(g), rtol=1e-5, atol=1e-7)
  # Zero targets in the whole batch: num_boxes clamps to 1, only the focal term remains.
  none = np.zeros((2, 3), bool)
  total0, grads0 = vg(outputs, tb_pad[:, :3], none)
  _, l0 = loss(outputs, tb_pad[:, :3], none)
  assert np.isfinite(float(total0))
  assert all(float(v) == 0.0 for k, v in l0.items() if not k.startswith("loss_ce"))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads0))
  # Box gradients are zero there (nothing is matched); logits still learn "no object".
  assert float(jnp.abs(grads0["pred_boxes"]).max()) == 0.0
  assert float(jnp.abs(grads0["pred_logits"]).max()) > 0.0


def test_count_boxes_global_and_per_device():
  mask = np.zeros((4, 3), bool)
  assert float(upn_losses.count_boxes(mask)) == 1.0  # clamp
  mask[0, :2] = True
  mask[3, :] = True
  assert float(upn_losses.count_boxes(mask)) == 5.0
  # psum over a mapped axis (as inside shard_map / pmap): 4 shards of one image each.
  glob = jax.vmap(lambda m: upn_losses.count_boxes(m[None], "d"), axis_name="d")(mask)
  np.testing.assert_array_equal(np.asarray(glob), 5.0)
  dev = jax.vmap(lambda m: upn_losses.count_boxes(m[None], "d", per_device=True),
                 axis_name="d")(mask)
  np.testing.assert_array_equal(np.asarray(dev), 1.25)
