"""Shared layers.

`layer_norm` is the vision towers' LayerNorm: fp32 statistics (two-pass variance, as PyTorch)
whatever the compute dtype, with its parameters on the logical "norm" axis.

`Projection` is a DenseGeneral whose kernel is created at its full multi-dimensional shape
with its logical axis names. Flax's `nn.DenseGeneral` initialises a flat 2-d kernel and
reshapes the boxed value, which applies a rank-3 sharding constraint to a rank-2 array as
soon as logical-axis rules and a mesh are active (it even does so at `apply`, where Flax
re-derives the shape). Creating the parameter at its real shape avoids that and keeps
fan-in/fan-out correct for the initialiser.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Projection(nn.Module):
  """y = x . kernel (+ bias), contracting the last `len(in_names)` axes of x.

  features: output feature shape, e.g. (N, H) for per-head projections or (D,).
  in_names / out_names: logical axis names of the contracted and the output axes.
  kernel shape = x.shape[-len(in_names):] + features, or features + x.shape[-len(in_names):]
  with `kernel_out_first` (torch nn.Linear's [out, in]; the same sums).
  """
  features: Sequence[int]
  in_names: Sequence[str | None]
  out_names: Sequence[str | None]
  use_bias: bool = True
  kernel_init: Any = None  # default: lecun-normal style variance over the contracted axes
  bias_init: Any = nn.initializers.zeros
  std: float | None = None  # a plain normal(std) init instead (HF-style LLM init)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: Any = None
  # dtype of the product (accumulation and result): None = `dtype`. bf16 inputs with an fp32
  # result keep the rounding to the matmul's inputs (what the MXU does anyway).
  out_dtype: Any = None
  kernel_out_first: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in, features = len(self.in_names), tuple(self.features)
    in_shape = x.shape[-n_in:]
    shape = tuple(in_shape) + features
    in_axes = tuple(range(n_in))
    out_axes = tuple(range(n_in, n_in + len(features)))
    if self.kernel_init is not None:
      init = self.kernel_init
    elif self.std is not None:
      init = nn.initializers.normal(self.std)
    else:
      init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                              in_axis=in_axes, out_axis=out_axes)
    names = tuple(self.in_names) + tuple(self.out_names)
    if self.kernel_out_first:
      n_out = len(features)
      in_axes, out_axes = tuple(range(n_out, n_out + n_in)), tuple(range(n_out))
      shape, names = features + tuple(in_shape), tuple(self.out_names) + tuple(self.in_names)
      if self.kernel_init is None and self.std is None:
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=in_axes, out_axis=out_axes)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, names), shape, self.param_dtype)
    # One 2-d matmul [N, prod(in)] x [prod(in), prod(features)]: the same sums, but XLA:CPU
    # lowers the backward of a multi-axis contraction as a transpose copy plus a slow generic
    # dot (a 125M LLM's MLP: 384 ms forward + backward against 261 ms flattened). The merged
    # leading axes keep the batch axis major, so a batch-sharded x stays batch-sharded.
    lead = x.shape[:x.ndim - n_in]
    x2 = x.astype(self.dtype).reshape(math.prod(lead), math.prod(in_shape))
    if self.kernel_out_first:
      y = dot_out_in(x2, kernel.astype(self.dtype).reshape(math.prod(features), math.prod(in_shape)),
                      self.precision, self.out_dtype)
    else:
      y = jnp.dot(x2, kernel.astype(self.dtype).reshape(math.prod(in_shape), math.prod(features)),
                  precision=self.precision, preferred_element_type=self.out_dtype)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, tuple(self.out_names)),
                        features, self.param_dtype)
      # On the 2-d product, before the reshape: with the bias added in [B, S, ...] (B > 1)
      # XLA:CPU's YNNPACK fusions allocated their intermediates afresh on every call (UPN-L
      # encoder at batch 2: two 1.2 GB mmaps a layer). The same sums either way.
      y = y + bias.astype(y.dtype).reshape(-1)
    return y.reshape(lead + features)


# From 2 up to this many rows (a decode step's batch), an [out, in] kernel is the product's left
# operand: W . x^T, then the small [out, rows] result transposed. XLA:CPU's GEMM streams a wide
# left operand against a narrow right one much better than the reverse: at 8 rows a chain of
# 576 -> 1536 -> 576 projections takes 0.66 ms a pair against 1.07, a tied 576 -> 49152 LM head
# 9.6 ms against 17.0 (a pair at 2 rows 0.47 / 0.68, at 32 rows 1.21 / 1.73); from about 48
# rows on the two orders cost the same. One row is a matrix-vector product, equally fast either
# way. Measured on the 2-core CPU only; on an accelerator the order costs one transpose of the
# small [out, rows] result.
KERNEL_FIRST_MAX_ROWS = 32


def dot_out_in(x: jax.Array, kernel: jax.Array, precision=None, out_dtype=None) -> jax.Array:
  """x [M, K] . kernel [N, K]^T -> [M, N], contracting both minor axes (no transpose copy)."""
  contract = (((1,), (1,)), ((), ()))
  if 1 < x.shape[0] <= KERNEL_FIRST_MAX_ROWS:
    # The barrier keeps XLA's simplifier from folding the transpose back into the product
    # (transpose(W . x^T) = x . W^T, the slow order).
    y_t = jax.lax.dot_general(kernel, x, contract, precision=precision, preferred_element_type=out_dtype)
    return jax.lax.optimization_barrier(y_t).T
  return jax.lax.dot_general(x, kernel, contract, precision=precision,
                             preferred_element_type=out_dtype)


def layer_norm(eps: float, param_dtype: Any, name: str) -> nn.LayerNorm:
  """nn.LayerNorm computing in fp32 with scale / bias on the logical axis "norm"."""
  return nn.LayerNorm(
      epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, use_fast_variance=False, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))
