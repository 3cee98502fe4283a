"""Swin's window attention, softmax(q k^T + bias) v, a few windows at a time on CPU.

Axis letters: W windows (of every image), M tokens of one window, N heads, H head dim,
Z the windows of one step.

A Swin window has only M = 144 tokens (12 x 12), but an 800 x 1129 image has 408 windows of 6
heads in the first stage: written densely, XLA:CPU fuses the score product, the softmax and the
value product of all windows into one kernel whose [W, N, M, M] scores (203 MB) go through
memory. Here the windows run Z at a time (`lax.map`), Z as large as keeps one step's fp32 scores
within `full_attention.SCORE_BYTES_PER_STEP` (about the last-level cache), and each row is
normalised after the value product. The bias is the sum of a per-head part (Swin's relative
position bias, learned: it gets a gradient) and an optional per-window part (the shifted
windows' mask, a constant, repeating every `window_bias.shape[0]` windows: one image). The
backward is FlashAttention 2's, as in `full_attention`: output and log-sum-exp are kept, each
step recomputes its probabilities, and the head bias's gradient is summed over the steps.
Each step moves its windows' heads before their tokens (in cache), so the products are plain
batched matrix products. One Swin-L block's attention at 800 x 1129, batch 1, dense -> stepped
(forward / forward + backward): stage 1 (408 windows x 6 heads) 231 -> 128-134 / 1196 -> 1020
ms, stage 3 (30 x 24) 68 -> 37-39 / 378 -> 320 ms; the whole backbone 13.2 -> 12.2 s.

Off CPU all windows are one step: a sequential map over the sharded window axis would
serialise the devices' work.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from chatrex_jax.ops import full_attention

Array = jax.Array


def window_attention(qkv: Array, head_bias: Array, window_bias: Array | None = None, *,
                     scale: float, windows_per_step: int | None = None) -> Array:
  """Multi-head attention within each window.

  qkv: [W, M, 3, N, H], Swin's qkv projection as it comes.
  head_bias: [N, M, M] float32, added to every window's scores of that head.
  window_bias: [P, M, M] float32 or None; window w gets window_bias[w % P] (P divides W; P is
  one image's windows for Swin's shift mask); a constant: it gets no gradient.
  scale: multiplies q before the score product (Swin: H ** -0.5).
  windows_per_step: windows per step of the map (default: on CPU as many as keep one step's
  fp32 scores within the budget while dividing P (W when P is 1); on other backends 0 = one
  step). It must divide W and, for P > 1, divide P or be a multiple of it.
  Returns [W, M, N, H] in qkv's dtype (tokens before heads, Swin's next layout); scores and
  softmax in at least fp32.
  """
  w, m, three, n, h = qkv.shape
  if three != 3 or head_bias.shape != (n, m, m):
    raise ValueError(f"qkv must be [W, M, 3, N, H] and head_bias [N, M, M]; got {qkv.shape} "
                     f"and {head_bias.shape}")
  if window_bias is None:
    window_bias = jnp.zeros((1, m, m), jnp.float32)
  period = window_bias.shape[0]
  if window_bias.shape[1:] != (m, m) or w % period:
    raise ValueError(f"window_bias must be [P, {m}, {m}] with P dividing the {w} windows; got "
                     f"{window_bias.shape}")
  acc = jnp.promote_types(qkv.dtype, jnp.float32)
  if windows_per_step is None:
    windows_per_step = 0
    if jax.default_backend() == "cpu":
      fit = max(1, full_attention.SCORE_BYTES_PER_STEP // (n * m * m * acc.itemsize))
      within = period if period > 1 else w
      windows_per_step = max(z for z in range(1, min(fit, within) + 1) if within % z == 0)
  z = windows_per_step or w
  if w % z or (period > 1 and period % z and z % period):
    raise ValueError(f"windows_per_step={windows_per_step} must divide the {w} windows and "
                     f"divide or be a multiple of the window bias period {period} (or be 0 / None)")
  if 1 < period < z:  # whole images per step: the window bias repeats within the step
    window_bias = jnp.tile(window_bias, (z // period, 1, 1))
  return _stepped(qkv.reshape(w // z, z, m, 3, n, h), head_bias.astype(acc),
                  window_bias.astype(acc), float(scale)).reshape(w, m, n, h)


def _bias_of_step(window_bias, i, z):
  """The [Z, M, M] window bias of step i (window_bias holds a whole number of steps), or
  window_bias itself when it is one window's, shared by all."""
  if window_bias.shape[0] == 1:
    return window_bias
  steps_per_period = window_bias.shape[0] // z
  start = (i % steps_per_period) * z
  return jax.lax.dynamic_slice_in_dim(window_bias, start, z, axis=0)


def _scores(qkv, head_bias, window_bias, scale):
  """qkv [Z, M, 3, N, H] -> (scaled q, k, v [Z, N, M, H], scores [Z, N, M, M] in the bias
  dtype)."""
  q, k, v = qkv.transpose(2, 0, 3, 1, 4)
  q = q * jnp.asarray(scale, q.dtype)
  s = jnp.einsum("ZNTH,ZNSH->ZNTS", q, k, preferred_element_type=head_bias.dtype)
  return q, k, v, s + head_bias[None] + window_bias[:, None]


def _step_forward(qkv, head_bias, window_bias, scale):
  """One step -> (out [Z, M, N, H] in qkv's dtype, log-sum-exp [Z, N, M])."""
  q, _, v, s = _scores(qkv, head_bias, window_bias, scale)
  peak = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - peak)
  total = jnp.sum(e, axis=-1, keepdims=True)
  out = jnp.einsum("ZNTS,ZNSH->ZNTH", e.astype(q.dtype), v, preferred_element_type=s.dtype)
  out = (out / total).astype(q.dtype).transpose(0, 2, 1, 3)
  return out, (peak + jnp.log(total))[..., 0]


def _forward(steps, head_bias, window_bias, scale, keep_lse):
  z = steps.shape[1]

  def step(a):
    i, qkv = a
    out, lse = _step_forward(qkv, head_bias, _bias_of_step(window_bias, i, z), scale)
    return (out, lse) if keep_lse else out
  return full_attention._map(step, (jnp.arange(steps.shape[0]), steps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _stepped(steps, head_bias, window_bias, scale):
  return _forward(steps, head_bias, window_bias, scale, keep_lse=False)


def _stepped_fwd(steps, head_bias, window_bias, scale):
  out, lse = _forward(steps, head_bias, window_bias, scale, keep_lse=True)
  return out, (steps, head_bias, window_bias, out, lse)


def _stepped_bwd(scale, residuals, d_out):
  """Per step: probabilities from the saved log-sum-exp, then FlashAttention 2's products;
  the head bias's gradient (the score gradient summed over windows) accumulates over steps.
  The window bias is a constant mask: its cotangent is zero."""
  steps, head_bias, window_bias, out, lse = residuals
  z = steps.shape[1]
  dtype = steps.dtype

  def step(d_head_bias, a):
    i, qkv, out, lse, do = a
    q_scaled, k, v, s = _scores(qkv, head_bias, _bias_of_step(window_bias, i, z), scale)
    p = jnp.exp(s - lse[..., None])
    acc = p.dtype
    do = do.transpose(0, 2, 1, 3)                                         # [Z, N, M, H]
    dv = jnp.einsum("ZNTS,ZNTH->ZNSH", p.astype(dtype), do, preferred_element_type=acc)
    dp = jnp.einsum("ZNTH,ZNSH->ZNTS", do, v, preferred_element_type=acc)
    delta = jnp.sum(do.astype(acc) * out.transpose(0, 2, 1, 3).astype(acc), axis=-1)
    ds = p * (dp - delta[..., None])
    dq = jnp.einsum("ZNTS,ZNSH->ZNTH", ds.astype(dtype), k, preferred_element_type=acc)
    dk = jnp.einsum("ZNTS,ZNTH->ZNSH", ds.astype(dtype), q_scaled, preferred_element_type=acc)
    dqkv = jnp.stack([dq * jnp.asarray(scale, acc), dk, dv]).astype(dtype)  # [3, Z, N, M, H]
    return d_head_bias + jnp.sum(ds, axis=0), dqkv.transpose(1, 3, 0, 2, 4)

  xs = (jnp.arange(steps.shape[0]), steps, out, lse, d_out.astype(dtype))
  if steps.shape[0] == 1:
    d_head_bias, dqkv = step(jnp.zeros_like(head_bias), jax.tree.map(lambda x: x[0], xs))
    dqkv = dqkv[None]
  else:
    d_head_bias, dqkv = jax.lax.scan(step, jnp.zeros_like(head_bias), xs)
  return dqkv, d_head_bias, jnp.zeros_like(window_bias)


_stepped.defvjp(_stepped_fwd, _stepped_bwd)

