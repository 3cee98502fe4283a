"""The training path's fused kernels against their dense definitions.

`ops.attention.causal_attention` (query blocks, FlashAttention-style backward) and
`ops.cross_entropy.fused_cross_entropy` (the LM head fused with the loss, in token chunks)
replace dense formulations inside `CausalLM`; here they are compared with those formulations
in float64 (where only the summation order differs) and in fp32 / bf16, values and gradients.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chatrex_jax.models.llm import CausalLM, LLMConfig
from chatrex_jax.ops.attention import causal_attention, default_block
from chatrex_jax.ops.cross_entropy import default_chunk, fused_cross_entropy


def dense_attention(q, k, v, key_valid, segment_ids=None):
  """The masked T x T formulation (`Attention` with a cache, and before the blocks)."""
  b, t, _, _, h = q.shape
  acc = jnp.promote_types(q.dtype, jnp.float32)
  allowed = (jnp.arange(t)[None, None, :] <= jnp.arange(t)[None, :, None]) & key_valid[:, None, :]
  if segment_ids is not None:
    allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
  s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=acc) / np.sqrt(h).astype(acc)
  s = jnp.where(allowed[:, None, None], s, jnp.finfo(acc).min)
  p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
  return jnp.einsum("BKGTS,BSKH->BTKGH", p, v)


def _attention_inputs(dtype, t, packed, seed=0):
  r = np.random.default_rng(seed)
  b, k, g, h = 2, 2, 3, 8
  q, key, v = (jnp.asarray(r.normal(size=s).astype(dtype)) for s in
               ((b, t, k, g, h), (b, t, k, h), (b, t, k, h)))
  key_valid = jnp.asarray(np.arange(t)[None] >= np.array([[0], [5]]))  # row 1: 5 left pads
  segments = jnp.asarray(np.broadcast_to(np.arange(t) // 13 + 1, (b, t))) if packed else None
  # Cotangent zero on padding queries: their outputs are never read (see ops/attention.py).
  weight = jnp.asarray(r.normal(size=q.shape).astype(dtype)) * key_valid[:, :, None, None, None]
  return q, key, v, key_valid, segments, weight


@pytest.mark.parametrize("t,block,packed", [(37, 8, False), (64, 16, True), (40, 128, False)])
def test_causal_attention_equals_dense_in_float64(t, block, packed):
  with jax.enable_x64(True):
    q, k, v, key_valid, segments, weight = _attention_inputs(np.float64, t, packed)
    fused = lambda q, k, v: causal_attention(q, k, v, key_valid, segments, block=block)
    dense = lambda q, k, v: dense_attention(q, k, v, key_valid, segments)
    out_f, out_d = fused(q, k, v), dense(q, k, v)
    assert out_f.dtype == jnp.float64
    seen = np.asarray(key_valid)[:, :, None, None, None]
    np.testing.assert_allclose(np.asarray(out_f) * seen, np.asarray(out_d) * seen, rtol=0, atol=1e-13)
    grads_f = jax.grad(lambda *a: jnp.sum(fused(*a) * weight), argnums=(0, 1, 2))(q, k, v)
    grads_d = jax.grad(lambda *a: jnp.sum(dense(*a) * weight), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", grads_f, grads_d):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-13, err_msg=name)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 5e-6), (jnp.bfloat16, 0.05)])
def test_causal_attention_low_precision(dtype, atol):
  q, k, v, key_valid, segments, weight = _attention_inputs(np.float32, 48, True, seed=1)
  cast = lambda *xs: [x.astype(dtype) for x in xs]
  q, k, v, weight = cast(q, k, v, weight)
  out_f = causal_attention(q, k, v, key_valid, segments, block=16)
  out_d = dense_attention(q, k, v, key_valid, segments)
  assert out_f.dtype == dtype
  seen = np.asarray(key_valid)[:, :, None, None, None]
  diff = np.abs(np.asarray(out_f, np.float32) - np.asarray(out_d, np.float32)) * seen
  assert diff.max() <= atol
  grads_f = jax.grad(lambda *a: jnp.sum(causal_attention(*a, key_valid, segments, block=16) * weight)
                     .astype(jnp.float32), argnums=(0, 1, 2))(q, k, v)
  grads_d = jax.grad(lambda *a: jnp.sum(dense_attention(*a, key_valid, segments) * weight)
                     .astype(jnp.float32), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", grads_f, grads_d):
    assert a.dtype == dtype
    scale = np.abs(np.asarray(b, np.float32)).max()
    assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max() <= atol * max(scale, 1), name


def test_default_sizes():
  assert [default_block(t) for t in (37, 512, 1024, 2048, 4096)] == [64, 64, 64, 128, 256]
  assert [default_chunk(v) for v in (100, 32_000, 49_152, 151_936)] == [1024, 256, 128, 32]


def _ce_inputs(dtype, seed=0):
  r = np.random.default_rng(seed)
  h = jnp.asarray(r.normal(size=(3, 37, 16)).astype(dtype))
  w = jnp.asarray(r.normal(size=(16, 50)).astype(dtype))
  targets = jnp.asarray(r.integers(0, 50, (3, 37)))
  valid = jnp.asarray(r.random((3, 37)) < 0.6)
  return h, w, targets, valid


def dense_cross_entropy(h, w, targets, valid):
  logits = jnp.einsum("BTD,DV->BTV", h, w, preferred_element_type=jnp.promote_types(h.dtype, jnp.float32))
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
  hits = valid & (jnp.argmax(logits, -1) == targets)
  return jnp.sum(jnp.where(valid, nll, 0.0)), hits


@pytest.mark.parametrize("chunking", [dict(chunk=8), dict(chunk=16), dict(chunk=512),
                                      dict(num_chunks=1), dict(num_chunks=4)])
def test_fused_cross_entropy_equals_dense_in_float64(chunking):
  """3 rows of 37 positions: chunks of 2 / 5 / 37 / 37 / 10 positions (padded at the end)."""
  with jax.enable_x64(True):
    h, w, targets, valid = _ce_inputs(np.float64)
    fused = lambda h, w: fused_cross_entropy(h, w, targets, valid, **chunking)
    dense = lambda h, w: dense_cross_entropy(h, w, targets, valid)
    (total_f, hits_f), (total_d, hits_d) = fused(h, w), dense(h, w)
    assert total_f.dtype == jnp.float64
    np.testing.assert_allclose(float(total_f), float(total_d), rtol=1e-14)
    np.testing.assert_array_equal(np.asarray(hits_f), np.asarray(hits_d))
    assert np.asarray(hits_f).any() and not np.asarray(hits_f)[~np.asarray(valid)].any()
    # The cotangent of the sum scales the gradients formed in the forward pass.
    grads_f = jax.grad(lambda h, w: 1.7 * fused(h, w)[0], argnums=(0, 1))(h, w)
    grads_d = jax.grad(lambda h, w: 1.7 * dense(h, w)[0], argnums=(0, 1))(h, w)
    for name, a, b in zip("hw", grads_f, grads_d):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-13, err_msg=name)


def test_fused_cross_entropy_bf16_matches_autodiff():
  h, w, targets, valid = _ce_inputs(np.float32, seed=2)
  h, w = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  total_f, _ = fused_cross_entropy(h, w, targets, valid, chunk=16)
  total_d, _ = dense_cross_entropy(h, w, targets, valid)
  assert total_f.dtype == jnp.float32  # logits and softmax in fp32 for bf16 inputs
  np.testing.assert_allclose(float(total_f), float(total_d), rtol=1e-5)
  grads_f = jax.grad(lambda h, w: fused_cross_entropy(h, w, targets, valid, chunk=16)[0],
                     argnums=(0, 1))(h, w)
  grads_d = jax.grad(lambda h, w: dense_cross_entropy(h, w, targets, valid)[0], argnums=(0, 1))(h, w)
  for a, b in zip(grads_f, grads_d):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("tie", [False, True])
def test_token_loss_equals_logits_path(tie):
  """`CausalLM.token_loss` on the final hidden states = log_softmax of `__call__`'s logits, and
  the gradients of every parameter agree (the head's, and those reaching the decoder through
  the hidden states). The blocked attention against transformers: tests/test_llm.py."""
  cfg = LLMConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
  model = CausalLM(cfg)
  ids = jnp.asarray(np.random.default_rng(3).integers(0, 97, (2, 70)))
  params = nn.unbox(model.init(jax.random.key(0), ids))["params"]
  targets, valid = ids[:, 1:], jnp.asarray(np.arange(69) % 3 != 0)[None].repeat(2, 0)

  def fused(p):
    hidden = model.apply({"params": p}, ids[:, :-1], compute_logits=False)["hidden"]
    return model.apply({"params": p}, hidden, targets, valid, method=CausalLM.token_loss)[0]

  def reference(p):
    logits = model.apply({"params": p}, ids[:, :-1])["logits"]
    return dense_cross_entropy_from_logits(logits, targets, valid)

  np.testing.assert_allclose(float(fused(params)), float(reference(params)), rtol=2e-6)
  g_f, g_r = jax.grad(fused)(params), jax.grad(reference)(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_f), jax.tree.leaves(g_r)):
    scale = float(np.abs(np.asarray(b)).max())
    assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= 2e-5 * max(scale, 1e-3), path


def dense_cross_entropy_from_logits(logits, targets, valid):
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0))
