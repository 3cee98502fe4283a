"""Multi-scale deformable attention vs the PyTorch grid_sample formulation (Deformable DETR's
`ms_deform_attn_core_pytorch`, `chatrex_jax.testing.torch_ms_deform_attn_core`), forward and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from chatrex_jax.ops import ms_deform_attn as ms_deform_attn_module
from chatrex_jax.ops.ms_deform_attn import ms_deform_attn
from chatrex_jax.testing import torch_ms_deform_attn_core

SHAPES = ((6, 7), (3, 4), (2, 2))


def make_inputs(seed, b=2, q=9, n=2, p=3, c=4, exact_integers=True):
  rng = np.random.default_rng(seed)
  s = sum(h * w for h, w in SHAPES)
  value = rng.standard_normal((b, s, n, c)).astype(np.float32)
  loc = rng.uniform(-0.3, 1.3, (b, q, n, len(SHAPES), p, 2)).astype(np.float32)
  if exact_integers:  # some samples exactly on pixel centres and on the borders
    for lvl, (h, w) in enumerate(SHAPES):
      loc[:, :2, :, lvl, :, 0] = (rng.integers(-1, w + 1, (b, 2, n, p)) + 0.5) / w
      loc[:, :2, :, lvl, :, 1] = (rng.integers(-1, h + 1, (b, 2, n, p)) + 0.5) / h
  logits = rng.standard_normal((b, q, n, len(SHAPES) * p)).astype(np.float32)
  attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return value, loc, attn.reshape(b, q, n, len(SHAPES), p)


# 9 queries of 2 images, 18 in all: query_chunk None is one pass (few queries), 3 makes 6 blocks
# of 3, 5 makes 4 blocks of 5 (a block holds queries of both images; 2 queries padded).
@pytest.mark.parametrize("query_chunk", [None, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_matches_grid_sample(seed, query_chunk, highest_precision):
  value, loc, attn = make_inputs(seed)
  want = torch_ms_deform_attn_core(torch.from_numpy(value), SHAPES, torch.from_numpy(loc),
                                   torch.from_numpy(attn)).numpy()
  got = np.asarray(jax.jit(ms_deform_attn, static_argnums=(1, 4))(value, SHAPES, loc, attn, query_chunk))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("query_chunk", [None, 3, 5])
def test_gradients_match_grid_sample(query_chunk, highest_precision):
  value, loc, attn = make_inputs(3, exact_integers=True)
  cot = np.random.default_rng(4).standard_normal((2, 9, 8)).astype(np.float32)
  tv, tl, ta = (torch.from_numpy(x).requires_grad_(True) for x in (value, loc, attn))
  (torch_ms_deform_attn_core(tv, SHAPES, tl, ta) * torch.from_numpy(cot)).sum().backward()
  grads = jax.grad(lambda v, l, a: jnp.sum(ms_deform_attn(v, SHAPES, l, a, query_chunk) * cot), argnums=(0, 1, 2))(
      value, loc, attn)
  for name, g, t in zip(("value", "locations", "weights"), grads, (tv, tl, ta)):
    want = t.grad.numpy()
    err = np.abs(np.asarray(g) - want).max() / max(np.abs(want).max(), 1.0)
    assert err <= 1e-5, f"d/d{name}: {err}"


def test_far_outside_samples_are_zero_and_finite():
  value, loc, attn = make_inputs(5)
  loc[...] = 1e9
  out = ms_deform_attn(value, SHAPES, loc, attn)
  assert np.all(np.asarray(out) == 0)


def test_bad_shapes_raise_clear_errors():
  value, loc, attn = make_inputs(6)
  with pytest.raises(ValueError, match="spatial shapes"):
    ms_deform_attn(value, SHAPES[:2] + ((3, 3),), loc, attn)
  with pytest.raises(ValueError, match="attention_weights"):
    ms_deform_attn(value, SHAPES, loc, attn[..., :1])
  with pytest.raises(ValueError, match="query_chunk"):
    ms_deform_attn(value, SHAPES, loc, attn, query_chunk=0)


def test_many_queries_take_blocks(monkeypatch):
  value, loc, attn = make_inputs(7)
  def scans(limit):
    monkeypatch.setattr(ms_deform_attn_module, "SINGLE_PASS_QUERIES", limit)
    return "scan" in str(jax.make_jaxpr(lambda v, l, a: ms_deform_attn(v, SHAPES, l, a))(value, loc, attn))
  assert not scans(9)  # 9 queries per image: one pass
  assert scans(8)


def test_backward_recomputes_the_windows():
  """The blocked backward keeps each block's rows and weights, not its gathered windows (at the
  UPN-L encoder size all windows are 6.2 GB): its scratch memory is a fraction of theirs."""
  shapes = ((48, 48), (24, 24))
  b, n, c, p = 1, 2, 16, 4
  s = sum(h * w for h, w in shapes)
  rng = np.random.default_rng(8)
  value = rng.standard_normal((b, s, n, c)).astype(np.float32)
  loc = rng.uniform(0, 1, (b, s, n, len(shapes), p, 2)).astype(np.float32)
  attn = np.full((b, s, n, len(shapes), p), 1 / (len(shapes) * p), np.float32)
  windows_bytes = b * s * n * len(shapes) * p * 4 * c * 4
  loss = lambda v, l, a: jnp.sum(ms_deform_attn(v, shapes, l, a) ** 2)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(value, loc, attn).compile()
  scratch = compiled.memory_analysis().temp_size_in_bytes
  assert scratch < windows_bytes / 2, (scratch, windows_bytes)
