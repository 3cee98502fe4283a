"""The XLA:CPU default that importing chatrex_jax sets (chatrex_jax/__init__.py).

Each case runs in a fresh interpreter: the flag is read when JAX starts its CPU backend, which
this test process has already done.
"""
import json
import os
import subprocess
import sys

import chatrex_jax

FLAG_NAME = chatrex_jax.CPU_SCHEDULER_FLAG.split("=")[0]

# A small ConvNeXt's forward: how much scratch memory XLA plans for it.
PLAN = """
import json, os
import chatrex_jax
import jax, jax.numpy as jnp
from chatrex_jax.models import convnext
cfg = convnext.ConvNeXtConfig(depths=(2, 2, 4, 2), dims=(32, 64, 128, 256))
model = convnext.ConvNeXt(cfg)
x = jax.ShapeDtypeStruct((4, 256, 256, 3), jnp.float32)
params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
temp = jax.jit(model.apply).lower(params, x).compile().memory_analysis().temp_size_in_bytes
print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", ""), "temp": temp}))
"""


def _plan(xla_flags: str | None) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", PLAN], env=env, capture_output=True, text=True,
                       check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_import_turns_off_the_concurrency_scheduler_and_the_plan_shrinks():
  default = _plan(None)
  assert default["xla_flags"] == chatrex_jax.CPU_SCHEDULER_FLAG
  users = _plan(f"{FLAG_NAME}=true")      # a user's explicit choice is kept as given
  assert users["xla_flags"] == f"{FLAG_NAME}=true"
  # The reason for the default: XLA keeps fewer large buffers alive at once (23% less here;
  # ConvNeXt-L at 768 px, batch 4: 541 instead of 2583 MB).
  assert default["temp"] < 0.85 * users["temp"], (default, users)


def test_other_xla_flags_are_kept():
  got = _plan("--xla_force_host_platform_device_count=2")
  assert got["xla_flags"] == f"--xla_force_host_platform_device_count=2 {chatrex_jax.CPU_SCHEDULER_FLAG}"
