"""Ahead-of-time compile check of the train step (chatrex_jax/tools/aot.py).

Default run: topology parsing, the abstract train state (shardings, indivisible parameters,
optimizer-state shardings; the trainer's real state has exactly these), and one real compile
of the tiny ChatRex train step on the 8 fake CPU devices of tests/conftest.py (data=2 x fsdp=2
x tensor=2), whose memory analysis must agree with the analytic per-device bytes, and of the
tiny UPN train step (pure FSDP) through the same `Trainer`-derived path.

Slow (`pytest -m slow tests/test_aot.py`): the CLI's re-exec onto N fake CPU devices, and the
7B stage-2 step for v5p-256 (needs libtpu importable: pip install "jax[tpu]").
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from chatrex_jax.tools import aot

GIB = 2 ** 30


def _cpu8():
  return jax.devices("cpu")[:8]


# --------------------------------------------------------------------------------- topologies

@pytest.mark.parametrize("name, devices, topology, hbm_gib", [
    ("v5p-256", 128, "v5p:4x4x8", 95),      # v5p-N counts TensorCores: 2 per chip
    ("v5p-8", 4, "v5p:2x2x1", 95),
    ("v5p-1024", 512, "v5p:8x8x8", 95),
    ("v4-32", 16, "v4:2x2x4", 32),
    ("v5litepod-16", 16, "v5e:4x4", 16),   # v5e / v6e count chips
    ("v6e-256", 256, "v6e:16x16", 32),
    ("v5p:4x4x8", 128, "v5p:4x4x8", 95),
])
def test_parse_tpu_topology(name, devices, topology, hbm_gib):
  t = aot.parse_topology(name)
  assert (t.platform, t.num_devices, t.topology, t.hbm_bytes) == ("tpu", devices, topology, hbm_gib * GIB)


def test_parse_cpu_and_bad_topologies():
  assert aot.parse_topology("cpu:8") == aot.Target("cpu:8", "cpu", 8, None, None)
  for bad, msg in [("v5p-7", "must be even"), ("v5p-48", "no standard slice"), ("h100-8", "unknown topology")]:
    with pytest.raises(ValueError, match=msg):
      aot.parse_topology(bad)


def test_mesh_sizes_resolve_minus_one():
  from chatrex_jax.train.sharding import MeshError, mesh_sizes
  assert mesh_sizes(2, -1, 2, 8) == [2, 2, 2]
  assert mesh_sizes(1, -1, 1, 128) == [1, 128, 1]
  with pytest.raises(MeshError, match="cannot be split"):
    mesh_sizes(3, -1, 1, 128)


# ---------------------------------------------------------------------------- abstract state

def test_indivisible_dimensions_are_replicated_and_reported():
  cfg = aot.quick_config()
  cfg.model.convnext = {**dict(cfg.model.convnext), "dims": [12, 20, 32, 64]}  # 12, 20 % 8 != 0
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 8, 1
  _, state, info = aot.abstract_train_state(cfg, _cpu8(), shard_opt_state=True)
  dropped = {d["path"]: d for d in info["replicated_dims"]}
  assert dropped["vision_tower_aux/stem_conv/kernel"]["rules_spec"] == [None, None, None, "fsdp"]
  assert dropped["vision_tower_aux/stem_conv/kernel"]["spec"] == [None, None, None, None]
  assert tuple(state.frozen["vision_tower_aux"]["stem_conv"]["kernel"].sharding.spec) == (None,) * 4
  # Divisible parameters keep their FSDP sharding.
  assert state.frozen["vision_tower_aux"]["stages_2"]["downsample_conv"]["kernel"].sharding.spec[3] == "fsdp"
  # The golden's mesh-free arithmetic replicates exactly the same dimensions.
  specs = aot.partition_specs(cfg, {"m": {"data": 1, "fsdp": 8, "tensor": 1}})
  assert specs["meshes"]["m"]["indivisible"] == sorted(dropped)
  assert specs["meshes"]["m"]["param_bytes_per_device"] == _bytes((state.trainable, state.frozen))


def _bytes(tree):
  return aot._tree_bytes_per_device(tree)[0]


def test_shard_opt_state_gives_adam_moments_the_parameter_shardings():
  _, state, info = aot.abstract_train_state(aot.quick_config(), _cpu8(), shard_opt_state=True)
  adam = state.opt_state[1][0]
  kernel = state.trainable["llm"]["decoder"]["layers"]["layer"]["mlp"]["gate_proj"]["kernel"]
  for moment in (adam.mu, adam.nu):
    leaf = moment["llm"]["decoder"]["layers"]["layer"]["mlp"]["gate_proj"]["kernel"]
    assert tuple(leaf.sharding.spec) == tuple(kernel.sharding.spec) == (None, "fsdp", "tensor")
  # mu + nu = 2 x the trainable bytes per device, plus the step counters.
  assert 0 <= _bytes(state.opt_state) - 2 * _bytes(state.trainable) <= 64
  assert info["opt_state_shardings"].startswith("param-matched")


def test_trainer_optimizer_state_is_sharded_like_the_parameters(tmp_path):
  """The trainer's real optimizer state (Trainer.opt_state_shardings): mu/nu sharded, not replicated."""
  import flax.linen as nn

  from chatrex_jax.train import optimizer as opt_lib
  from chatrex_jax.train.main import build_task
  from chatrex_jax.train.trainer import Trainer
  config = aot.quick_config()
  trainer = Trainer(config, build_task(config), tmp_path)
  abstract, _, mask, _, _ = trainer.param_layout()
  trainable, _ = opt_lib.partition(nn.unbox(abstract), mask)
  trainer.tx, _ = opt_lib.make_optimizer(config.optim, params=trainable)
  shardings = trainer.opt_state_shardings(abstract, mask)
  _, state, _ = aot.abstract_train_state(config, _cpu8())
  assert jax.tree.structure(shardings) == jax.tree.structure(state.opt_state)
  want_shardings = jax.tree.map(lambda x: x.sharding, state.opt_state)
  for got, want in zip(jax.tree.leaves(shardings), jax.tree.leaves(want_shardings)):
    assert got.spec == want.spec
  assert _bytes(state.opt_state) - 2 * _bytes(state.trainable) <= 64


# ------------------------------------------------------------------------------------ compile

@pytest.fixture(scope="module")
def quick_report():
  config = aot.quick_config()
  target = aot.parse_topology("cpu:8")
  return aot.run(config, target, backend="cpu", shard_opt_state=True,
                 compiler_options=aot.FAST_CPU_COMPILE)


def test_quick_compile_report(quick_report):
  r = quick_report
  assert r["path"] == "cpu-fake-devices" and r["num_devices"] == 8
  assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert (r["global_batch"], r["seq_len"], r["llm_layers"], r["scan_layers"]) == (8, 32, 2, True)
  mem, a = r["memory_analysis_per_device"], r["analytic_bytes_per_device"]
  # The compiled program's arguments are exactly the state shards + the batch shard per device.
  state = a["total"] + a["step_and_rng"]
  assert mem["argument_size_in_bytes"] == state + a["batch"]
  # Donation: the new state is written over the old one.
  assert mem["alias_size_in_bytes"] == state
  assert mem["temp_size_in_bytes"] > 0
  assert r["peak_estimate_bytes_per_device"] >= mem["argument_size_in_bytes"]
  assert r["optimizer_state_replicated_large"] == [] and r["replicated_by_divisibility"] == []
  assert r["flops_per_step"] > 0
  json.dumps(r)  # the report is JSON-able
  text = aot.format_report(r)
  assert "cpu-fake-devices" in text and "argument_size_in_bytes" in text


def test_analytic_bytes_match_the_partition_arithmetic(quick_report):
  """Per-device parameter bytes from the shardings == total / shard count, leaf by leaf."""
  config = aot.quick_config()
  specs = aot.partition_specs(config, {"quick": quick_report["mesh"]})
  assert specs["meshes"]["quick"]["indivisible"] == []
  a = quick_report["analytic_bytes_per_device"]
  assert a["trainable_params"] + a["frozen_params"] == specs["meshes"]["quick"]["param_bytes_per_device"]


def test_init_state_is_the_abstract_state():
  """What the trainer allocates is what AOT compiles for: shapes, dtypes and shardings."""
  from chatrex_jax.train.main import build_task
  from chatrex_jax.train.trainer import Trainer
  config = aot.quick_config()
  trainer = Trainer(config, build_task(config))
  abstract, real = trainer.abstract_state(), trainer.init_state()
  assert jax.tree.structure(abstract) == jax.tree.structure(real)
  for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
    assert (a.shape, a.dtype, a.sharding) == (r.shape, r.dtype, r.sharding)


UPN_CONFIG = "configs/upn_train_tiny.py:d32"
UPN_OVERRIDES = ("data.batch_size=8", "data.max_size=32", "data.max_targets=4",
                 "model.swin.depths=(1, 1, 1, 1)", "model.enc_layers=1")


@pytest.mark.slow  # ~1.5 minutes on 2 cores; the ChatRex step's AOT compile stays in the default run
def test_upn_train_step_compiles():
  """The UPN trainer through the same path as ChatRex: Trainer state, task batch, step."""
  from chatrex_jax.train.upn_task import BATCH_KEYS
  config = aot.load_config(UPN_CONFIG, UPN_OVERRIDES)
  r = aot.run(config, aot.parse_topology("cpu:8"), backend="cpu",
              compiler_options=aot.FAST_CPU_COMPILE)
  assert r["path"] == "cpu-fake-devices" and r["task"] == "upn"
  assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert list(r["batch"]) == list(BATCH_KEYS) and r["global_batch"] == 8
  assert r["batch"]["images"] == [[8, 32, 32, 3], "float32"]
  mem, a = r["memory_analysis_per_device"], r["analytic_bytes_per_device"]
  state = a["total"] + a["step_and_rng"]
  # The step reads every state shard and the batch (jit prunes the unused `num_boxes`).
  assert state < mem["argument_size_in_bytes"] <= state + a["batch"]
  assert mem["alias_size_in_bytes"] == state
  assert r["optimizer_state_replicated_large"] == [] and r["flops_per_step"] > 0
  assert r["llm_layers"] is None and "upn, global batch images [8, 32, 32, 3]" in aot.format_report(r)
  json.dumps(r)


# ------------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_cli_reexecs_onto_fake_cpu_devices(tmp_path):
  """16 devices > the 8 of this process: main() re-executes itself with XLA_FLAGS set."""
  out = tmp_path / "r.json"
  rc = aot.main(["--quick", "--topology", "cpu:16", "--shard-opt-state",
                 "--config.mesh.fsdp=4", "--report", str(out)])
  assert rc == 0
  r = json.loads(out.read_text())
  assert r["num_devices"] == 16 and r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 2}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_7b_stage2_compiles_for_v5p_256(tmp_path):
  """Minutes of compilation: the 7B stage-2 step against compile-only v5p-256 devices."""
  out = tmp_path / "r.json"
  cmd = [sys.executable, "-m", "chatrex_jax.tools.aot", "--config", "chatrex_7b:stage2",
         "--topology", "v5p-256", "--shard-opt-state", "--report", str(out)]
  subprocess.run(cmd, check=False, cwd=aot.REPO_ROOT, env=dict(os.environ))
  r = json.loads(out.read_text())
  assert r["path"] == "tpu-topology" and r["num_devices"] == 128
  assert r["fits"] is True, aot.format_report({**r, "path_note": ""})
  # Parameters + AdamW state (fp32): ~8.16B x 12 bytes / 128 devices.
  assert math.isclose(r["analytic_bytes_per_device"]["total"], 8.16e9 * 12 / 128, rel_tol=0.05)
