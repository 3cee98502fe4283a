"""`ops.full_attention` (heads in cache-sized steps, FlashAttention-2 backward) against the dense
softmax(q k^T) v: in float64, where only the summation order differs, and in fp32 / bf16,
values and gradients; and the two models that use it against their dense attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chatrex_jax.ops import full_attention as fa


def dense(q, k, v):
  acc = jnp.promote_types(q.dtype, jnp.float32)
  p = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=acc), axis=-1)
  return jnp.einsum("BNTS,BSNH->BTNH", p.astype(q.dtype), v, preferred_element_type=acc).astype(q.dtype)


def _inputs(dtype, t, s, seed=0):
  r = np.random.default_rng(seed)
  b, n, h = 2, 6, 8
  q, k, v, w = (jnp.asarray(r.normal(size=shape).astype(dtype)) for shape in
                ((b, t, n, h), (b, s, n, h), (b, s, n, h), (b, t, n, h)))
  return q * 0.7, k, v, w


@pytest.mark.parametrize("t,s", [(13, 13), (5, 21)])
@pytest.mark.parametrize("heads_per_step", [None, 0, 1, 4, 12])
def test_full_attention_equals_dense_in_float64(t, s, heads_per_step):
  with jax.enable_x64(True):
    q, k, v, w = _inputs(np.float64, t, s)
    grouped = lambda q, k, v: fa.full_attention(q, k, v, heads_per_step=heads_per_step)
    out = grouped(q, k, v)
    assert out.dtype == jnp.float64 and out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense(q, k, v)), rtol=0, atol=1e-13)
    g_ours = jax.grad(lambda *a: jnp.sum(grouped(*a) * w), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(dense(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_ours, g_ref):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-6), (jnp.bfloat16, 0.03)])
def test_full_attention_low_precision(dtype, atol):
  q, k, v, w = _inputs(np.float32, 17, 17, seed=1)
  with jax.enable_x64(True):
    ref = dense(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
    g_ref = jax.grad(lambda *a: jnp.sum(dense(*a) * jnp.asarray(w, jnp.float64)), argnums=(0, 1, 2))(
        *(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  grouped = jax.jit(lambda q, k, v: fa.full_attention(q, k, v, heads_per_step=3))
  out = grouped(q, k, v)
  assert out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(ref), rtol=0, atol=atol)
  g = jax.grad(lambda *a: jnp.sum(grouped(*a).astype(jnp.float32) * w), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", g, g_ref):
    assert a.dtype == dtype
    scale = float(np.abs(np.asarray(b)).max())
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b), rtol=0, atol=atol * scale,
                               err_msg=name)


def test_default_step_fits_the_score_budget(monkeypatch):
  """On CPU the default step takes the most pairs whose scores fit the budget and divide B x N."""
  q = jnp.zeros((2, 10, 6, 4))
  monkeypatch.setattr(fa, "SCORE_BYTES_PER_STEP", 5 * 10 * 10 * 4)   # room for 5 pairs: 4 divides 12
  steps = []
  real_map = jax.lax.map
  monkeypatch.setattr(jax.lax, "map", lambda f, xs: steps.append(jax.tree.leaves(xs)[0].shape[:2])
                      or real_map(f, xs))
  fa.full_attention(q, q, q)
  assert steps == [(3, 4)]


def test_heads_per_step_must_divide_pairs():
  q = jnp.zeros((2, 3, 5, 4))
  with pytest.raises(ValueError, match="must divide batch x heads = 10"):
    fa.full_attention(q, q, q, heads_per_step=3)
