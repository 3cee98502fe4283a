"""Unmasked multi-head attention, softmax(q k^T) v, a few heads at a time on CPU.

Axis letters: B batch, T queries, S keys, N heads, H head dim, Z the (image, head) pairs of
one step.

Used by CLIP (577 tokens, 16 heads) and the UPN decoder's query self-attention (900 queries, 8
heads). Written densely, XLA:CPU fuses the score product, the softmax and the value product of
all B x N heads into one kernel whose [B, N, T, S] scores (85 MB for CLIP-L at batch 4) go
through memory. Here the pairs run Z at a time (`lax.map`), Z as large as keeps a step's fp32
scores within `SCORE_BYTES_PER_STEP` (about the last-level cache), and each row is normalised
after the value product (T x H divisions instead of T x S). The backward is FlashAttention 2's:
the forward keeps its output and each row's log-sum-exp, and every step recomputes its
probabilities, so no [T, S] array outlives its step. On 2 cores (forward / forward + backward):
CLIP-L at batch 4 166 / 381 ms dense -> 91-93 / 324-328 ms (PyTorch's fused forward: 57 ms);
the UPN decoder at batch 1 34 / 79 ms -> 15 / 47 ms, at batch 2 52 / 144 ms -> 29 / 97 ms.

Off CPU all pairs are one step (the same formulas, one product each): a sequential map over
the batch and head axes, the ones sharded across devices, would serialise the devices' work.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

# One step's fp32 scores at most about this CPU's last-level cache (16 MB).
SCORE_BYTES_PER_STEP = 16 << 20


def full_attention(q: Array, k: Array, v: Array, *, heads_per_step: int | None = None,
                   acc_dtype=None) -> Array:
  """softmax(q k^T) v per head, no mask; q is scaled by the caller.

  q [B, T, N, H], k / v [B, S, N, H] in the compute dtype -> [B, T, N, H] in q's dtype.
  heads_per_step: (image, head) pairs per step of the map (default: on CPU as many as keep one
  step's scores within `SCORE_BYTES_PER_STEP`; on other backends 0 = all pairs in one product).
  acc_dtype: of scores, softmax and products (default q's dtype promoted to at least fp32).
  """
  acc = jnp.dtype(acc_dtype or jnp.promote_types(q.dtype, jnp.float32))
  b, t, n, h = q.shape
  pairs = b * n
  if heads_per_step is None:
    heads_per_step = 0
    if jax.default_backend() == "cpu":
      fit = max(1, SCORE_BYTES_PER_STEP // (t * k.shape[1] * acc.itemsize))
      heads_per_step = max(z for z in range(1, min(fit, pairs) + 1) if pairs % z == 0)
  if heads_per_step and pairs % heads_per_step:
    raise ValueError(f"heads_per_step={heads_per_step} must divide batch x heads = {pairs} "
                     "(or be 0 / None)")
  z = heads_per_step or pairs
  steps = lambda x: x.transpose(0, 2, 1, 3).reshape(pairs // z, z, x.shape[1], h)  # [B*N/Z, Z, T|S, H]
  out = _grouped(steps(q), steps(k), steps(v.astype(q.dtype)), acc.name)
  return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)


def _map(f, xs):
  """lax.map over the leading (step) axis, or one call when there is one step."""
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    return jax.tree.map(lambda y: y[None], f(jax.tree.map(lambda x: x[0], xs)))
  return jax.lax.map(f, xs)


def _step_forward(q, k, v, acc):
  """[Z, T, H], [Z, S, H] x 2 -> (out [Z, T, H] in q's dtype, log-sum-exp [Z, T] in acc)."""
  scores = jnp.einsum("ZTH,ZSH->ZTS", q, k, preferred_element_type=acc)
  m = jnp.max(scores, axis=-1, keepdims=True)
  e = jnp.exp(scores - m)
  total = jnp.sum(e, axis=-1)
  out = jnp.einsum("ZTS,ZSH->ZTH", e.astype(q.dtype), v, preferred_element_type=acc)
  return (out / total[..., None]).astype(q.dtype), m[..., 0] + jnp.log(total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped(q, k, v, acc_name):
  acc = jnp.dtype(acc_name)
  return _map(lambda a: _step_forward(*a, acc)[0], (q, k, v))


def _grouped_fwd(q, k, v, acc_name):
  acc = jnp.dtype(acc_name)
  out, lse = _map(lambda a: _step_forward(*a, acc), (q, k, v))
  return out, (q, k, v, out, lse)


def _grouped_bwd(acc_name, residuals, d_out):
  """FlashAttention-2's backward per step: the probabilities are recomputed from the saved
  log-sum-exp, so nothing of size [T, S] is kept from the forward pass."""
  acc = jnp.dtype(acc_name)

  def step(a):
    q, k, v, out, lse, do = a
    p = jnp.exp(jnp.einsum("ZTH,ZSH->ZTS", q, k, preferred_element_type=acc) - lse[..., None])
    dv = jnp.einsum("ZTS,ZTH->ZSH", p.astype(q.dtype), do, preferred_element_type=acc)
    dp = jnp.einsum("ZTH,ZSH->ZTS", do, v, preferred_element_type=acc)
    delta = jnp.sum(do.astype(acc) * out.astype(acc), axis=-1, keepdims=True)
    ds = (p * (dp - delta)).astype(q.dtype)
    dq = jnp.einsum("ZTS,ZSH->ZTH", ds, k, preferred_element_type=acc)
    dk = jnp.einsum("ZTS,ZTH->ZSH", ds, q, preferred_element_type=acc)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
  q, k, v, out, lse = residuals
  return _map(step, (q, k, v, out, lse, d_out.astype(q.dtype)))


_grouped.defvjp(_grouped_fwd, _grouped_bwd)
