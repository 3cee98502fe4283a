"""Causal GQA attention through jax's Pallas TPU flash-attention kernel, sharded by `shard_map`.

Same contract as `ops.attention.causal_attention` (axis letters there: B batch, T positions, K
key/value heads, G query heads per key head, H head dim); for TPU training, where the XLA
formulation writes every query block's scores and probabilities to HBM. In a compile of one
Qwen2.5-7B layer (forward + backward, 2048 tokens, one v5p chip) its attention core is 5.2 of
the layer's 14.0 GB accessed; this kernel keeps the scores in VMEM (launch/README.md).

Masking: a query sees key j when j <= its position, and both carry the same segment id. Invalid
keys (`key_valid` False) get segment -1, the id of no valid query, so valid rows match the XLA
path exactly. An invalid (padding) query also gets -1 and sees the invalid keys before it,
itself included: its output, which nothing reads, stays finite.

Sharding: XLA cannot partition a Pallas call, so under a mesh (`jax.set_mesh`) the kernel runs
per shard in `shard_map`: the batch over the axes of the logical "activation_batch" rule, the
key/value heads over "activation_kv_heads" where they divide. Without a mesh it runs as is.

The kernel needs T to be a multiple of 128; `supported(t)` says whether it applies.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array

MIN_BLOCK = 128


def block_size(length: int) -> int:
  """Query / key block of the kernel: the largest of 512, 256, 128 dividing the length."""
  for b in (512, 256, MIN_BLOCK):
    if length % b == 0:
      return b
  raise ValueError(f"the TPU flash-attention kernel needs a length divisible by {MIN_BLOCK}, "
                   f"got {length}: pad the sequence or use attention_impl='xla'")


def supported(length: int) -> bool:
  return length % MIN_BLOCK == 0


def _kernel(q, k, v, seg):
  """q [B, T, K, G, H], k / v [B, T, K, H], seg [B, T] int32 -> [B, T, K, G, H] (one shard)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  b, t, kh, g, h = q.shape
  blk = block_size(t)
  heads_major = lambda x: x.transpose(0, 2, 1, 3)                        # [B, N, T, H]
  qn = heads_major(q.reshape(b, t, kh * g, h))
  # The kernel wants as many key heads as query heads: head n reads key head n // G.
  kn = heads_major(jnp.repeat(k, g, axis=2))
  vn = heads_major(jnp.repeat(v.astype(q.dtype), g, axis=2))
  sizes = fa.BlockSizes(block_q=blk, block_k_major=blk, block_k=blk, block_b=1,
                        block_q_major_dkv=blk, block_k_major_dkv=blk, block_k_dkv=blk,
                        block_q_dkv=blk, block_k_major_dq=blk, block_k_dq=blk, block_q_dq=blk)
  out = fa.flash_attention(qn, kn, vn, segment_ids=fa.SegmentIds(seg, seg), causal=True,
                           sm_scale=1.0 / math.sqrt(h), block_sizes=sizes)
  return out.transpose(0, 2, 1, 3).reshape(b, t, kh, g, h)


def _mesh_axes(rule: str, size: int, mesh) -> tuple[str, ...] | None:
  """The mesh axes the logical rule maps to, if they divide `size` (else None: replicated)."""
  axes = nn.logical_to_mesh_axes((rule,))[0]
  if axes is None:
    return None
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
  n = math.prod(mesh.shape[a] for a in axes)
  return axes if axes and size % n == 0 else None


def causal_attention(q: Array, k: Array, v: Array, key_valid: Array,
                     segment_ids: Array | None = None) -> Array:
  """q [B, T, K, G, H] (RoPE applied, compute dtype), k / v [B, T, K, H], key_valid [B, T],
  segment_ids [B, T] or None -> [B, T, K, G, H] in q's dtype. T a multiple of 128."""
  ids = jnp.zeros(key_valid.shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  seg = jnp.where(key_valid.astype(bool), ids, -1)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _kernel(q, k, v, seg)
  batch = _mesh_axes("activation_batch", q.shape[0], mesh)
  heads = _mesh_axes("activation_kv_heads", q.shape[2], mesh)
  q_spec, kv_spec = P(batch, None, heads, None, None), P(batch, None, heads, None)
  return jax.shard_map(_kernel, in_specs=(q_spec, kv_spec, kv_spec, P(batch, None)),
                       out_specs=q_spec, check_vma=False)(q, k, v, seg)
