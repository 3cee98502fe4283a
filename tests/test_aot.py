"""Ahead-of-time compile check of the train step (chatrex_jax/tools/aot.py).

Default run: topology parsing, the abstract train state (shardings, indivisible parameters,
optimizer-state shardings; the trainer's real state has exactly these), and one real compile
of the tiny ChatRex train step on the 8 fake CPU devices of tests/conftest.py (data=2 x fsdp=2
x tensor=2), whose memory analysis must agree with the analytic per-device bytes, and of the
tiny UPN train step (pure FSDP) through the same `Trainer`-derived path.

Slow (`pytest -m slow tests/test_aot.py`): the CLI's re-exec onto N fake CPU devices, and the
7B stage-2 step for v5p-256 (needs libtpu importable: pip install "jax[tpu]").
"""
import copy
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


# ------------------------------------------------------------ FLOP counting and the roofline

def test_loop_correction_counts_every_scanned_layer_and_loss_chunk():
  """Scanned layers and loss chunks are while loops whose body cost analysis counts once.

  The traced program (before XLA's optimisations): the count of a 4-layer scanned step in 2
  loss chunks, taken on it with every layer in the program (`whole_program_config`), matches
  the same step traced without a scan within 0.1% (measured 0.02%: the scan's residual
  bookkeeping), and is far above what the scanned program reports. The compiled program
  (--compiled-costs): the loop
  body measured on the cut towers is exactly the real step's, the missed head chunk is what
  one chunk instead of two adds, and the whole is never below the unrolled step's and above it
  only by the work a rolled loop re-does per iteration that unrolled layers share (3-6% of a
  layer's FLOPs at these tiny widths, measured; under 5% of the step)."""
  config = aot.quick_config()
  config.model.llm = {**dict(config.model.llm), "num_hidden_layers": 4}
  config.model.loss_chunks = 2
  target = aot.parse_topology("cpu:8")
  fast = aot.FAST_CPU_COMPILE

  def report(c, **kw):
    return aot.run(c, target, backend="cpu", compiler_options=fast, **kw)

  r = report(config, correct_loops=True, compiled_costs=True)
  unrolled = copy.deepcopy(config)
  unrolled.model.scan_unroll, unrolled.model.loss_chunks = 4, 1
  ref = report(unrolled)
  flat = copy.deepcopy(config)
  flat.model.scan_layers, flat.model.loss_chunks = False, 1
  flat_program = report(flat)["program_cost_reported_per_device"]
  program = r["program_cost_per_device"]
  assert program["flops"] == pytest.approx(flat_program["flops"], rel=1e-3)
  assert r["program_cost_reported_per_device"]["flops"] < 0.6 * program["flops"]
  assert r["flops_per_step"] == program["flops"]

  correction = r["loop_correction"]
  assert correction["compiles"] == 3
  parts = {}
  for layers, scan, chunks in [(2, True, 2), (0, False, 2), (2, True, 1)]:
    c = copy.deepcopy(config)
    c.model.llm = {**dict(c.model.llm), "num_hidden_layers": layers}
    c.model.scan_layers, c.model.loss_chunks = scan, chunks
    parts[(layers, scan, chunks)] = report(c)["cost_reported_per_device"]
  for k in ("flops", "transcendentals"):
    body = parts[(2, True, 2)][k] - parts[(0, False, 2)][k]
    head = parts[(2, True, 1)][k] - parts[(2, True, 2)][k]
    assert body > 0 and head > 0
    assert correction["per_layer"][k] == pytest.approx(body, rel=1e-9), k
    assert correction["head_missed"][k] == pytest.approx(head, rel=1e-9), k
  want = ref["cost_reported_per_device"]["flops"]
  assert want * 0.999 <= r["cost_per_device"]["flops"] <= want * 1.05
  assert r["cost_reported_per_device"]["flops"] < want - 2.5 * correction["per_layer"]["flops"]


def test_whole_program_count_and_declared_kernel_costs():
  """The FLOP count runs the attention in XLA ops (a Pallas call is opaque to cost analysis),
  and the kernels' declared costs are read from lowered (escaped JSON) and compiled (numbers as
  JSON strings) HLO text alike."""
  from chatrex_jax.tools import roofline
  config = aot.quick_config()
  with config.unlocked():
    config.model.attention_impl = "pallas_tpu"
    config.model.loss_chunks = 4
  whole = roofline.whole_program_config(config)
  assert whole.model.attention_impl == "xla" and whole.model.loss_chunks == 1
  assert config.model.attention_impl == "pallas_tpu"           # the original is untouched
  lowered = ('custom_call_target="tpu_custom_call", backend_config="{\\"cost_estimate\\": '
             '{\\"flops\\": 60, \\"transcendentals\\": 3, \\"bytes_accessed\\": 7}}"')
  compiled = ('custom_call_target="tpu_custom_call" "cost_estimate":{"flops":"100",'
              '"transcendentals":"2","bytes_accessed":"5","remote_bytes_transferred":"0"} '
              'custom_call_target="tpu_custom_call"')
  got = roofline.declared_kernel_costs(lowered + compiled)
  assert got == {"kernels": 3, "with_estimate": 2, "flops": 160.0, "transcendentals": 5.0,
                 "bytes_accessed": 12.0}
  assert roofline.declared_kernel_costs("no kernels")["kernels"] == 0


def test_roofline_takes_the_slowest_resource_at_its_public_peak():
  from chatrex_jax.tools import roofline
  v5p = aot.parse_topology("v5p-256")
  assert (v5p.peak_flops, v5p.hbm_bandwidth, v5p.ici_bandwidth) == (459e12, 2765e9, 1200e9)
  program = {"flops": 459e12 * 0.2}
  compiled = {"flops": 459e12 * 0.21, "bytes accessed": 2765e9 * 0.05, "optimal_seconds": 0.25}
  b = roofline.roofline(program, compiled, 459e12 * 0.15, v5p, collective_bytes=1200e9 * 0.1)
  assert (b["t_compute_s"], b["t_hbm_s"], b["t_ici_s"]) == pytest.approx((0.2, 0.05, 0.1))
  assert b["bound_by"] == "compute" and b["step_time_bound_s"] == pytest.approx(0.2)
  assert b["mfu_bound"] == pytest.approx(0.75) and b["hfu_bound"] == pytest.approx(1.0)
  assert b["mfu_at_xla_estimate"] == pytest.approx(0.6) and b["compiled_note"] is None
  b = roofline.roofline(program, compiled, 1.0, v5p, collective_bytes=1200e9 * 0.5)
  assert b["bound_by"] == "ici" and b["step_time_bound_s"] == pytest.approx(0.5)
  # A compiled count far from the program's: the compiler's own loops; its figures left out.
  b = roofline.roofline(program, {**compiled, "flops": 459e12 * 0.05}, 1.0, v5p, None)
  assert b["t_hbm_s"] is None and b["xla_optimal_seconds"] is None and "0.25x" in b["compiled_note"]


def test_fsdp_collective_bytes_follow_the_shardings():
  """Pure FSDP over 8: each parameter gathered twice in bf16, gradients reduce-scattered in
  fp32, 7/8 of each array passing through a device; a trainable parameter left replicated (a
  dimension 8 does not divide) has its fp32 gradient all-reduced (2 x 7/8 of it)."""
  from chatrex_jax.tools import roofline
  config = aot.quick_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 8, 1
  _, state, _ = aot.abstract_train_state(config, _cpu8())
  got = roofline.fsdp_collective_bytes(state, compute_itemsize=2)
  want = 0.0
  for tree, trainable in ((state.trainable, True), (state.frozen, False)):
    for x in jax.tree.leaves(tree):
      k = math.prod(x.shape) // math.prod(x.sharding.shard_shape(x.shape))
      if k > 1:
        want += math.prod(x.shape) * (2 * 2 + 4 * trainable) * (k - 1) / k
      elif trainable:
        want += 2 * math.prod(x.shape) * 4 * 7 / 8
  assert want > 0 and got == pytest.approx(want)


def test_model_flops_count_no_weight_gradients_for_a_frozen_llm():
  """Stage 1 trains the projectors and embeddings under a frozen LLM: 4N per token for the
  layers (forward, backward to the inputs), 6N for the trained head; stage 2 trains all (6N)."""
  import numpy as np

  from chatrex_jax.train.main import build_task
  flops = {}
  for stage in ("stage1", "stage2"):
    config = aot.quick_config()
    config.stage = stage
    task = build_task(config)
    llm = task.model_config.llm
    flops[stage] = task.model_flops({"attention_mask": np.ones((2, 32), np.int32)})
  d, f, n = llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers
  kv = llm.num_key_value_heads * llm.dim_per_head
  layer, head, attn = 2 * d * d + 2 * d * kv + 3 * d * f, d * llm.vocab_size, 4 * n * d * 32
  tokens = 64
  assert flops["stage2"] == pytest.approx(tokens * (6 * (n * layer + head) + 3 * attn))
  assert flops["stage1"] == pytest.approx(tokens * (4 * n * layer + 6 * head + 2 * attn))


def test_hbm_exhaustion_is_a_report_not_a_crash():
  msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permission denied\nRan out of memory in memory space "
         "hbm. Used 101.25G of 95.74G hbm. Exceeded hbm capacity by 5.51G.\n\nTotal hbm usage")
  got = aot._hbm_exhausted(RuntimeError(msg))
  assert got["used_bytes"] == pytest.approx(101.25 * GIB) and "Used 101.25G" in got["message"]
  assert aot._hbm_exhausted(RuntimeError("INVALID_ARGUMENT: shapes")) is None


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason='needs the TPU compiler: pip install -e ".[tpu-aot]" (CI installs it)')
def test_tiny_step_compiles_for_a_tpu_topology(tmp_path):
  """The TPU compiler on compile-only devices of a v5p-16 slice (8 chips, data 2 x fsdp 2 x
  tensor 2): its memory analysis, whole-program cost and XLA's time estimate. At 128 tokens the
  LLM's attention is jax's Pallas flash-attention kernel (forward, and its two backward kernels)
  under shard_map, compiled by Mosaic; ConvNeXt's depthwise conv is XLA's grouped conv. The
  whole-program FLOPs count the attention, which is opaque inside the kernels (counted with
  them, the program falls below PaLM's model FLOPs: 86.9 against 94.4 MFLOP per device)."""
  out = tmp_path / "r.json"
  cmd = [sys.executable, "-m", "chatrex_jax.tools.aot", "--quick", "--topology", "v5p-16",
         "--backend", "tpu", "--report", str(out), "--config.data.seq_len=128", "--correct-loops"]
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  proc = subprocess.run(cmd, cwd=aot.REPO_ROOT, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["path"] == "tpu-topology" and r["device_kind"] == "TPU v5" and r["num_devices"] == 8
  assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and r["fits"] is True
  assert r["attention_impl"] == "pallas_tpu" and r["pallas_kernels"] >= 3
  assert r["dwconv_impl"] == "conv"
  declared = r["pallas_declared_cost"]   # jax's kernel declares its forward's cost only
  assert declared["with_estimate"] >= 1 and declared["flops"] > 0
  assert r["program_cost_per_device"]["flops"] >= r["roofline"]["model_flops_per_device"]
  mem, a = r["memory_analysis_per_device"], r["analytic_bytes_per_device"]
  assert 0 < mem["peak_memory_in_bytes"] < 2 ** 30
  assert mem["argument_size_in_bytes"] >= a["total"]   # TPU layouts pad, never shrink
  cost = r["cost_reported_per_device"]
  assert cost["flops"] > 0 and cost["bytes accessed"] > 0 and cost["optimal_seconds"] > 0


def test_aot_table_rows_and_batch_fit(tmp_path):
  """The table's grid, the overrides a user needs per slice, and the batch fit's algebra."""
  from chatrex_jax.tools import aot_table
  rows = aot_table.grid()
  assert len(rows) == 16 and len({r.name for r in rows}) == 16
  assert aot_table.parse_row("stage2-qwen2.5-v5e-256").overrides() == ["--config.mesh.tensor=2"]
  assert aot_table.parse_row("stage2-vicuna-v5p-256").overrides() == []
  assert aot_table.parse_row("stage2-qwen2.5-v5p-256-b3").overrides() == [
      "--config.data.batch_size=384"]

  def report(topology, chips, batch, args, peak):
    return {"target": topology, "num_devices": chips, "global_batch": batch, "fits": True,
            "hbm_bytes_per_device": 95 * GIB, "mesh": {"data": 1, "fsdp": chips, "tensor": 1},
            "memory_analysis_per_device": {"argument_size_in_bytes": args,
                                           "peak_memory_in_bytes": peak},
            "analytic_bytes_per_device": {"batch": 0}, "time_s": {"compile": 60.0}}
  # peak = args + 2 GiB + 10 GiB x per-chip batch
  reports = {"stage2-qwen2.5-v5p-64": report("v5p-64", 32, 128, 3 * GIB, 3 * GIB + 42 * GIB),
             "stage2-qwen2.5-v5p-256": report("v5p-256", 128, 128, 1 * GIB, 1 * GIB + 12 * GIB)}
  fit = aot_table.batch_fits(reports)[("stage2", "qwen2.5", "v5p")]
  assert fit["per_row_bytes"] == pytest.approx(10 * GIB) and fit["fixed_bytes"] == pytest.approx(2 * GIB)
  assert aot_table.max_batch(reports["stage2-qwen2.5-v5p-256"], fit) == 9   # (95 - 1 - 2) // 10
  table = aot_table.render(reports)
  assert ("| qwen2.5 | stage2 | v5p-256 | 128 | 1 x 128 x 1 | none, XLA | 128 (1) | 13.0 / 95 GiB "
          "| yes | 9 (fit)") in table
  # Two different programs (here the remat policy) give no fit.
  other = {**reports["stage2-qwen2.5-v5p-64"], "remat_policy": "dots_no_batch"}
  assert aot_table.batch_fits({**reports, "stage2-qwen2.5-v5p-64": other}) == {}
  assert "not compiled yet" in table


def test_committed_aot_table_reports_agree_with_the_analytic_flop_count():
  """The reports behind launch/README.md's table (TPU compiler, 7B configs): each row's
  whole-program FLOPs, counted by XLA on the traced step, against PaLM's analytic count the
  trainer's MFU uses (LLM only: the towers and remat's recomputed attention add a few percent;
  PaLM counts the whole T x T attention where the causal blocks do about half of it, so a step
  without remat may fall below the count by up to half its attention term), and the table
  renders every committed row."""
  from chatrex_jax.configs import chatrex_7b
  from chatrex_jax.tools import aot_table
  reports = aot_table.load(aot_table.DEFAULT_DIR)
  assert "stage2-qwen2.5-v5p-256" in reports
  for name, r in reports.items():
    assert r["path"] == "tpu-topology", name
    whole, model = r["program_cost_per_device"]["flops"], r["roofline"]["model_flops_per_device"]
    passes = 2 if r["stage"] == "stage1" else 3     # the LLM frozen in stage 1: no weight grads
    tokens = r["global_batch"] * r["seq_len"] / r["num_devices"]
    width = chatrex_7b.BASES[r["base"]]["hidden_size"]
    attention = passes * 4 * r["llm_layers"] * width * r["seq_len"] * tokens
    assert model - attention / 2 <= whole <= 1.08 * model, (name, whole / model)
  table = aot_table.render(reports)
  for name in reports:
    row = aot_table.parse_row(name)
    assert f"| {row.base} | {row.stage} | {row.topology} | {reports[name]['num_devices']} |" in table
