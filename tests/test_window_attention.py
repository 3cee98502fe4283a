"""`ops.window_attention` (Swin windows in cache-sized steps, FlashAttention-2 backward with the
head bias's gradient) against the dense softmax(q k^T + bias) v: in float64, where only the
summation order differs, and in fp32 / bf16; values and the gradients of q, k, v and the head
bias. The Swin block that uses it is compared with timm in test_swin.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chatrex_jax.ops import full_attention
from chatrex_jax.ops import window_attention as wa

W, M, N, H = 12, 9, 3, 4
SCALE = H ** -0.5


def dense(qkv, head_bias, window_bias):
  """Swin's formula: (q * scale) k^T + head bias + window bias[w % P], softmax, times v."""
  acc = jnp.promote_types(qkv.dtype, jnp.float32)
  q, k, v = qkv.transpose(2, 0, 3, 1, 4)
  q = q * SCALE
  s = jnp.einsum("WNTH,WNSH->WNTS", q, k, preferred_element_type=acc) + head_bias[None]
  if window_bias is not None:
    p = window_bias.shape[0]
    s = s + jnp.tile(window_bias, (qkv.shape[0] // p, 1, 1))[:, None]
  prob = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("WNTS,WNSH->WTNH", prob.astype(qkv.dtype), v,
                    preferred_element_type=acc).astype(qkv.dtype)


def attend(qkv, head_bias, window_bias, **kw):
  return wa.window_attention(qkv, head_bias, window_bias, scale=SCALE, **kw)


def _inputs(dtype, period, seed=0):
  r = np.random.default_rng(seed)
  qkv = r.normal(size=(W, M, 3, N, H)).astype(dtype)
  head_bias = r.normal(size=(N, M, M)).astype(dtype)
  window_bias = None
  if period:  # Swin's mask: 0 or -100
    window_bias = np.where(r.random((period, M, M)) < 0.3, -100.0, 0.0).astype(dtype)
    window_bias[:, np.arange(M), np.arange(M)] = 0.0   # every row keeps itself
  cot = r.normal(size=(W, M, N, H)).astype(dtype)
  return qkv, head_bias, window_bias, cot


@pytest.mark.parametrize("period,windows_per_step", [
    (None, None), (None, 0), (None, 1), (None, 4),
    (6, None), (6, 2), (6, 3), (6, 12),       # steps within one image, and two images per step
    (1, 6), (4, 2), (4, 4)])
def test_window_attention_equals_dense_in_float64(period, windows_per_step):
  with jax.enable_x64(True):
    qkv, hb, wb, cot = (None if x is None else jnp.asarray(x) for x in _inputs(np.float64, period))
    ours = lambda qkv, hb: attend(qkv, hb, wb, windows_per_step=windows_per_step)
    out = ours(qkv, hb)
    assert out.dtype == jnp.float64 and out.shape == (W, M, N, H)
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense(qkv, hb, wb)), rtol=0, atol=1e-13)
    g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums=(0, 1))(qkv, hb)
    g_ref = jax.grad(lambda *a: jnp.sum(dense(*a, wb) * cot), argnums=(0, 1))(qkv, hb)
    for name, a, b in zip(("qkv", "head_bias"), g_ours, g_ref):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-6), (jnp.bfloat16, 0.03)])
def test_window_attention_low_precision(dtype, atol):
  qkv, hb, wb, cot = _inputs(np.float32, 6, seed=1)
  with jax.enable_x64(True):
    x64 = [jnp.asarray(x, jnp.float64) for x in (qkv, hb, wb)]
    ref = dense(*x64)
    g_ref = jax.grad(lambda qkv, hb: jnp.sum(dense(qkv, hb, x64[2]) * jnp.asarray(cot, jnp.float64)),
                     argnums=(0, 1))(*x64[:2])
  ours = jax.jit(lambda qkv, hb: attend(qkv, hb, jnp.asarray(wb), windows_per_step=3))
  qkv_low = jnp.asarray(qkv).astype(dtype)
  out = ours(qkv_low, jnp.asarray(hb))
  assert out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(ref), rtol=0, atol=atol)
  g = jax.grad(lambda *a: jnp.sum(ours(*a).astype(jnp.float32) * cot), argnums=(0, 1))(
      qkv_low, jnp.asarray(hb))
  assert g[0].dtype == dtype and g[1].dtype == jnp.float32
  for name, a, b in zip(("qkv", "head_bias"), g, g_ref):
    scale = float(np.abs(np.asarray(b)).max())
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b), rtol=0, atol=atol * scale,
                               err_msg=name)


def test_default_step_fits_the_score_budget(monkeypatch):
  """On CPU the default step takes the most windows whose scores fit the budget and divide one
  image's windows (the mask period), or all windows without a mask."""
  qkv, hb, wb, _ = _inputs(np.float32, 6)
  monkeypatch.setattr(full_attention, "SCORE_BYTES_PER_STEP", 5 * N * M * M * 4)  # room for 5
  steps = []
  real_map = jax.lax.map
  monkeypatch.setattr(jax.lax, "map", lambda f, xs: steps.append(jax.tree.leaves(xs)[1].shape[:2])
                      or real_map(f, xs))
  attend(jnp.asarray(qkv), jnp.asarray(hb), jnp.asarray(wb))
  attend(jnp.asarray(qkv), jnp.asarray(hb), None)
  assert steps == [(4, 3), (3, 4)]   # 3 divides the period 6; 4 divides the 12 windows


def test_bad_arguments_are_refused():
  qkv, hb, wb, _ = (jnp.asarray(x) for x in _inputs(np.float32, 6))
  with pytest.raises(ValueError, match="divide the 12 windows"):
    attend(qkv, hb, wb, windows_per_step=5)
  with pytest.raises(ValueError, match="period 6"):
    attend(qkv, hb, wb, windows_per_step=4)
  with pytest.raises(ValueError, match="P dividing the 12 windows"):
    attend(qkv, hb, wb[:5])
  with pytest.raises(ValueError, match=r"head_bias \[N, M, M\]"):
    attend(qkv, hb[:2], wb)
