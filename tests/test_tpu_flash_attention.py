"""The Pallas TPU flash-attention path (ops/tpu_flash_attention.py) against the XLA path.

The kernel runs in Pallas's TPU interpret mode on the CPU: the same kernel code, block
structure and masking, executed by the interpreter. That it compiles for a real TPU is covered
by the AOT compile of the tiny step for a v5p slice (tests/test_aot.py), which selects it.
"""
import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from chatrex_jax.ops import attention
from chatrex_jax.ops import tpu_flash_attention as tfa
from chatrex_jax.train import sharding

B, T, K, G, H = 4, 256, 2, 3, 32


def _inputs():
  r = np.random.default_rng(0)
  q = jnp.asarray(r.normal(size=(B, T, K, G, H)), jnp.float32)
  k = jnp.asarray(r.normal(size=(B, T, K, H)), jnp.float32)
  v = jnp.asarray(r.normal(size=(B, T, K, H)), jnp.float32)
  valid = np.ones((B, T), bool)
  valid[1, 200:] = False          # right padding
  valid[2, :17] = False           # left padding
  segments = np.where(np.arange(T) < 100, 1, 2)[None].repeat(B, 0).astype(np.int32)
  segments[3] = 1                 # one row unpacked
  return q, k, v, jnp.asarray(valid), jnp.asarray(segments)


def _loss_and_grads(fn, q, k, v, valid, segments):
  seen = valid[:, :, None, None, None]

  def loss(q, k, v):
    out = fn(q, k, v, valid, segments)
    return jnp.sum(jnp.where(seen, out, 0.0) * jnp.cos(jnp.arange(H))), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def _check(got, want, valid):
  out, grads = got
  ref_out, ref_grads = want
  seen = np.asarray(valid)[:, :, None, None, None]
  assert np.isfinite(np.asarray(out)).all()          # padding rows too: nothing to poison a grad
  np.testing.assert_allclose(np.asarray(out) * seen, np.asarray(ref_out) * seen, rtol=0, atol=1e-5)
  for name, g, ref in zip("qkv", grads, ref_grads):
    scale = float(np.abs(np.asarray(ref)).max())
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=0, atol=1e-5 * scale, err_msg=name)


def test_matches_the_xla_path_with_padding_and_packing():
  inputs = _inputs()
  xla = lambda *a: attention.causal_attention(*a, acc_dtype=jnp.float32)
  want = _loss_and_grads(xla, *inputs)
  with pltpu.force_tpu_interpret_mode():
    got = jax.jit(lambda *a: _loss_and_grads(tfa.causal_attention, *a))(*inputs)
  _check(got, want, inputs[3])


def test_sharded_by_shard_map_under_the_trainers_mesh(monkeypatch):
  """fsdp 4 x tensor 2: the batch over fsdp, the 2 key heads over tensor, one kernel per shard.

  TPU interpret mode simulates every device's memory and waits on all of them, which does not
  run under a CPU shard_map; the kernel's numbers are the test above. Here each shard runs the
  XLA path on what it is given (invalid keys = segment -1), so this checks the wrapper: the
  shapes each shard sees and that the sharded result is the unsharded one."""
  inputs = _inputs()
  want = _loss_and_grads(lambda *a: attention.causal_attention(*a, acc_dtype=jnp.float32), *inputs)
  shard_shapes = []

  def per_shard(q, k, v, seg):
    shard_shapes.append((q.shape, k.shape, seg.shape))
    return attention.causal_attention(q, k, v, seg >= 0, seg, acc_dtype=jnp.float32)
  monkeypatch.setattr(tfa, "_kernel", per_shard)
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2, devices=jax.devices()[:8])
  fn = jax.jit(lambda *a: _loss_and_grads(tfa.causal_attention, *a))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.FSDP_RULES):
    got = fn(*inputs)
  assert shard_shapes[0] == ((B // 4, T, K // 2, G, H), (B // 4, T, K // 2, H), (B // 4, T))
  _check(got, want, inputs[3])


def test_lengths_the_kernel_cannot_block_are_refused_clearly():
  assert tfa.block_size(2048) == 512 and tfa.block_size(384) == 128
  assert tfa.supported(256) and not tfa.supported(100)
  with pytest.raises(ValueError, match="divisible by 128.*attention_impl='xla'"):
    tfa.block_size(100)


_COST_PROBE = """
import json, os
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding
from chatrex_jax.ops import tpu_flash_attention as tfa
from chatrex_jax.tools import roofline
chip = SingleDeviceSharding(topologies.get_topology_desc("v5p:2x2x1", "tpu").devices[0])
s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
args = (s(1, 512, 2, 2, 128), s(1, 512, 2, 128), s(1, 512, 2, 128),
        jax.ShapeDtypeStruct((1, 512), jnp.bool_))
loss = lambda q, k, v, m: tfa.causal_attention(q, k, v, m).astype(jnp.float32).sum()
out = {}
for name, fn in (("forward", loss), ("gradient", jax.grad(loss, argnums=(0, 1, 2)))):
  compiled = jax.jit(fn, in_shardings=(chip,) * 4).lower(*args).compile()
  out[name] = {**roofline.cost_of(compiled),
               "declared": roofline.declared_kernel_costs(compiled.as_text())}
print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason='needs the TPU compiler: pip install -e ".[tpu-aot]" (CI installs it)')
def test_xla_times_the_backward_kernels_that_declare_no_cost():
  """launch/README's flash rows rest on XLA's TPU cost model timing jax's flash kernels. Only
  the forward kernel declares a cost; this pins that the two backward kernels, which declare
  none, still get time in XLA's estimate (were they free, the estimate would flatter the step)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", _COST_PROBE], env={**env, "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  forward, gradient = got["forward"], got["gradient"]
  assert forward["declared"] == {**forward["declared"], "kernels": 1, "with_estimate": 1}
  assert gradient["declared"]["kernels"] == 3 and gradient["declared"]["with_estimate"] == 1
  # The backward does 3.5x the forward's matmul work; XLA gives it at least the forward's time.
  assert gradient["optimal_seconds"] > 2.0 * forward["optimal_seconds"] > 0
