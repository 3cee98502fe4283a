"""Fused multi-level object encoder (chatrex_jax/models/object_encoder.py) vs the official
composition in torch (F.interpolate + cat + torchvision roi_align + mean + sine box embedding),
the `multi_level_roi` golden fixture, and the sine embedding / upsampling building blocks.

Run: pytest tests/test_object_encoder.py
"""
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chatrex_jax import testing
from chatrex_jax.models import object_encoder as oe
from chatrex_jax.ops import position
from chatrex_jax.tools.equivalence import object_encoder as ref

TOL = 1e-5  # docs/architecture.md "Numeric tolerances": max abs error <= 1e-5 of the output scale


def _maps(rng, batch, sizes, channels):
  """NCHW numpy maps, one per level."""
  return [rng.standard_normal((batch, c, h, w)).astype(np.float32)
          for (h, w), c in zip(sizes, channels)]


def _nhwc(maps):
  return [jnp.asarray(m.transpose(0, 2, 3, 1)) for m in maps]


def _boxes(rng, img_h, img_w, cell):
  named = [[0, 0, img_w, img_h],                                   # whole image
           [-0.3 * img_w, -0.2 * img_h, 0.5 * img_w, 0.6 * img_h],  # partly outside
           [2.2 * cell, 1.3 * cell, 2.6 * cell, 1.7 * cell],       # smaller than a cell
           [0.4 * img_w, 0.1 * img_h, 0.4 * img_w, 0.9 * img_h],   # zero width
           [0.7 * img_w, 0.6 * img_h, 1.4 * img_w, 1.3 * img_h]]   # past the bottom-right
  xy = rng.uniform(0, 0.8, size=(5, 2)) * [img_w, img_h]
  wh = rng.uniform(0.05, 0.6, size=(5, 2)) * [img_w, img_h]
  return np.concatenate([named, np.concatenate([xy, xy + wh], 1)]).astype(np.float32)


@pytest.mark.parametrize("add_pos,block_bytes", [(True, 4 * 2**20), (False, 4 * 2**20),
                                                 (True, 1000), (True, None)])
def test_matches_official_composition(add_pos, block_bytes, highest_precision):
  """Non-square maps, a non-integer resize ratio (3 -> 12 rows, 5 -> 20 cols is 4x; 2 -> 12 and
  3 -> 20 are not), a padded batch of 2 with a validity mask; one GEMM per level (the default
  budget fits these maps, and None) and the row-blocked loop (1000 bytes: 1-2 rows a block)."""
  rng = np.random.default_rng(11 + add_pos)
  scale = 0.25
  sizes, channels = [(12, 20), (6, 10), (3, 5), (2, 3)], [8, 16, 8, 24]
  maps = _maps(rng, 2, sizes, channels)
  img_h, img_w = sizes[0][0] / scale, sizes[0][1] / scale
  boxes = np.stack([_boxes(rng, img_h, img_w, 1 / scale) for _ in range(2)])   # [2, 10, 4]
  mask = np.ones(boxes.shape[:2], bool)
  mask[1, 7:] = False
  boxes[1, 7:] = rng.uniform(-1e3, 1e3, size=(3, 4))          # padding rows hold junk

  enc = oe.MultiLevelRoIEncoder(spatial_scale=scale, add_pos_embedding=add_pos,
                                block_bytes=block_bytes)
  got = np.asarray(jax.jit(enc.apply)({}, _nhwc(maps), jnp.asarray(boxes), jnp.asarray(mask)))
  assert got.shape == (2, 10, sum(channels))
  for b in range(2):
    want = ref.torch_multi_level_roi([torch.from_numpy(m[b:b + 1]) for m in maps],
                                     torch.from_numpy(boxes[b]), 7, scale, add_pos)[0].numpy()
    valid = mask[b]
    testing.assert_close_to_scale(got[b][valid], want[valid], TOL, f"image {b}")
    assert np.all(got[b][~valid] == 0)


def test_feature_gradients_match_torch_autograd(highest_precision):
  rng = np.random.default_rng(5)
  sizes, channels = [(8, 8), (4, 4), (2, 2), (1, 1)], [2, 4, 4, 6]
  maps = _maps(rng, 1, sizes, channels)
  boxes = _boxes(rng, 32, 32, 4.0)
  cot = rng.standard_normal((1, len(boxes), sum(channels))).astype(np.float32)

  tmaps = [torch.from_numpy(m).requires_grad_(True) for m in maps]
  out = ref.torch_multi_level_roi(tmaps, torch.from_numpy(boxes), 7, 0.25, True)
  (out * torch.from_numpy(cot)).sum().backward()

  enc = oe.MultiLevelRoIEncoder(spatial_scale=0.25)
  loss = lambda fs: jnp.sum(enc.apply({}, fs, jnp.asarray(boxes)[None]) * jnp.asarray(cot))
  grads = jax.grad(loss)(_nhwc(maps))
  for k, (g, t) in enumerate(zip(grads, tmaps)):
    testing.assert_close_to_scale(g, t.grad.numpy().transpose(0, 2, 3, 1), TOL, f"level {k}")


def test_golden_fixture(golden_dir):
  from chatrex_jax.tools import check_equivalence
  buf = io.StringIO()
  assert check_equivalence.check(golden_dir / "multi_level_roi", out=buf), buf.getvalue()
  assert "PASS multi_level_roi" in buf.getvalue()
  assert "multi_level_roi/output_without_pos_embedding" in buf.getvalue()


@pytest.mark.parametrize("in_size,out_size", [(24, 192), (96, 192), (3, 7), (7, 5), (1, 4),
                                              (5, 5)])
def test_interpolate_matrix_is_torch_bilinear(in_size, out_size):
  x = np.random.default_rng(in_size).standard_normal((1, 2, in_size, 3)).astype(np.float32)
  want = F.interpolate(torch.from_numpy(x), size=(out_size, 3), mode="bilinear",
                       align_corners=False).numpy()
  m = oe.interpolate_matrix(in_size, out_size)
  got = np.einsum("oh,bchw->bcow", m, x)
  testing.assert_close_to_scale(got, want, 1e-6, f"{in_size}->{out_size}")
  np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)


def test_sine_box_embedding_matches_rexseek():
  """720 features per coordinate, order (cy, cx, w, h) - the real 2880-d embedding."""
  rng = np.random.default_rng(0)
  xyxy = np.sort(rng.uniform(-50, 800, size=(6, 2, 2)), axis=1).transpose(0, 2, 1)
  xyxy = xyxy.reshape(6, 4)[:, [0, 2, 1, 3]].astype(np.float32)     # x1 y1 x2 y2
  got = np.asarray(oe.box_position_embedding(jnp.asarray(xyxy), (768.0, 768.0), 720))
  b = torch.from_numpy(xyxy.copy()) / 768.0
  cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2,
                        b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], -1)
  want = ref.torch_gen_sineembed_for_position(cxcywh[None], 720)[0].numpy()
  assert got.shape == want.shape == (6, 2880)
  testing.assert_close_to_scale(got, want, TOL, "box embedding")
  # The shared helper with the documented call gives the same numbers.
  shared = position.sine_embed(jnp.asarray(cxcywh.numpy())[:, (1, 0, 2, 3)], 720, 10000)
  testing.assert_close_to_scale(shared, want, TOL, "position.sine_embed")
  # y first: swapping the x and y blocks must not match.
  assert not np.allclose(got[:, :720], got[:, 720:1440])
  np.testing.assert_allclose(got[:, :720], want[:, :720], atol=1e-5)


def test_batch_sharded_over_devices(highest_precision):
  n = jax.device_count()
  if n < 2:
    pytest.skip("needs several (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
  rng = np.random.default_rng(2)
  sizes, channels = [(8, 8), (4, 4), (2, 2), (1, 1)], [4, 4, 8, 8]
  maps = _nhwc(_maps(rng, n, sizes, channels))
  boxes = jnp.asarray(np.stack([_boxes(rng, 32, 32, 4.0) for _ in range(n)]))
  mask = jnp.asarray(rng.uniform(size=boxes.shape[:2]) > 0.3)
  enc = oe.MultiLevelRoIEncoder(spatial_scale=0.25)
  want = np.asarray(enc.apply({}, maps, boxes, mask))
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  shard = lambda x: jax.device_put(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data", *([None] * (x.ndim - 1)))))
  args = ({}, [shard(m) for m in maps], shard(boxes), shard(mask))
  got = jax.jit(enc.apply)(*args)
  assert got.sharding.spec[0] == "data"
  hlo = jax.jit(enc.apply).lower(*args).compile().as_text()
  for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute"):
    assert op not in hlo, f"batch-sharded encoder communicates ({op}): something got replicated"
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def test_real_size_never_materialises_the_upsampled_concat():
  """Compile only (no FLOPs): XLA's buffer plan at the real size stays far below the
  192x192x2880 fp32 concat (425 MB) that the official path allocates."""
  b, o = 1, 100
  shapes = [(b, 192, 192, 192), (b, 96, 96, 384), (b, 48, 48, 768), (b, 24, 24, 1536)]
  feats = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  enc = oe.MultiLevelRoIEncoder()
  compiled = jax.jit(enc.apply).lower({}, feats, jax.ShapeDtypeStruct((b, o, 4), jnp.float32),
                                      jax.ShapeDtypeStruct((b, o), jnp.bool_)).compile()
  mem = compiled.memory_analysis()
  concat_bytes = 192 * 192 * 2880 * 4
  assert mem.output_size_in_bytes == b * o * 2880 * 4
  # Row blocks of 4 MiB: ~7 MB of temporaries (weights, blocks, per-axis sampling tables).
  assert mem.temp_size_in_bytes < concat_bytes / 50, mem.temp_size_in_bytes


def test_bad_inputs_raise():
  f = [jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 4, 4, 4))]
  enc = oe.MultiLevelRoIEncoder()
  with pytest.raises(ValueError, match="level 0 must be the largest"):
    enc.apply({}, f[::-1], jnp.zeros((1, 2, 4)))
  with pytest.raises(ValueError, match=r"boxes must be \[B=1, O, 4\]"):
    enc.apply({}, f, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="mask must be"):
    enc.apply({}, f, jnp.zeros((1, 2, 4)), jnp.ones((1, 3), bool))
  with pytest.raises(ValueError, match="divisible by 8"):
    enc.apply({}, [jnp.zeros((1, 8, 8, 6)), jnp.zeros((1, 4, 4, 4))], jnp.zeros((1, 2, 4)))
  with pytest.raises(ValueError, match="same B"):
    enc.apply({}, [jnp.zeros((1, 8, 8, 4)), jnp.zeros((2, 4, 4, 4))], jnp.zeros((1, 2, 4)))
  assert math.isclose(oe.interpolate_matrix(2, 4).sum(), 4.0)
