"""Ahead-of-time compile check of the train step for a target topology, without the hardware.

  python -m chatrex_jax.tools.aot --config chatrex_7b:stage2 --topology v5p-256 \
      [--report out.json] [--config.mesh.fsdp=64 ...]
  python -m chatrex_jax.tools.aot --quick            # tiny config, 8 fake CPU devices (CI)
  python -m chatrex_jax.tools.aot --write-golden tests/golden/chatrex_7b_partition_specs.json

What it does, mirroring `chatrex_jax.train.trainer.Trainer` step for step but ABSTRACTLY
(`jax.eval_shape` + `jax.ShapeDtypeStruct`s carrying `NamedSharding`s; no parameter is ever
allocated, so the 7B model costs nothing):

1. Devices of the target. Path "tpu-topology": `jax.experimental.topologies.get_topology_desc`
   builds compile-only TPU devices for the named slice; this needs libtpu importable
   (`pip install "jax[tpu]"`, or the libtpu wheel on PYTHONPATH), no TPU. Path
   "cpu-fake-devices" (fallback, or `--backend cpu`): N host CPU devices
   (`XLA_FLAGS=--xla_force_host_platform_device_count=N`, set in a re-executed subprocess
   before jax starts) with the same number of devices and the same mesh shape. Memory numbers
   of the CPU path come from the CPU compiler (no TPU layouts / fusion / HBM scheduling):
   they are an indication, not a TPU budget.
2. The mesh of the config (`config.mesh`, `sharding.make_mesh` as the trainer does) over those
   devices; the logical rules of the config; parameter shardings from
   `sharding.logical_shardings` (which replicates a dimension its mesh axes do not divide:
   the report lists those parameters).
3. The stage mask (trainable / frozen), the optimizer of the config, and the optimizer-state
   shardings as the trainer gets them (each moment with its parameter's sharding,
   `Trainer.opt_state_shardings`); `--replicated-opt-state` shows what leaving them to XLA
   would cost (OPT_STATE_REPLICATED).
4. The jitted `make_train_step` with the trainer's in/out shardings and donation, lowered
   under the mesh and the logical-axis rules with a batch of the config's GLOBAL batch size
   and sequence length (batch axis over ("data", "fsdp")), then compiled.
5. Report (JSON, and a readable summary on stdout): path used, devices, mesh, compile time,
   `compiled.memory_analysis()` per device (argument / output / alias / temp / generated
   code), the analytic per-device bytes of parameters + optimizer state (shard shapes of the
   shardings above), the target's HBM per device and whether the estimate fits, FLOPs per
   step from the cost analysis.

TPU names: `v5p-N`, `v4-N` count TensorCores (megacore: 2 per chip, one JAX device per
chip), so v5p-256 = 128 chips = 128 JAX devices, topology 4x4x8; `v5litepod-N`, `v5e-N`,
`v6e-N` count chips (= JAX devices). A raw libtpu topology name (`v5p:4x4x8`) works too, and
`cpu:N` asks for N fake CPU devices directly.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time
from typing import Optional

from chatrex_jax.configs import apply_overrides, load_config, split_overrides
from chatrex_jax.errors import UserError, command

GIB = 1024 ** 3

# chips -> physical topology (3D torus generations: v4, v5p; 2D: v5e, v6e).
_TOPO_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_TOPO_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}
# generation -> (libtpu name prefix, TensorCores per JAX device in the accelerator-type
# name, topology table, HBM bytes per chip)
_GENERATIONS = {
    "v4": ("v4", 2, _TOPO_3D, 32 * GIB),
    "v5p": ("v5p", 2, _TOPO_3D, 95 * GIB),
    "v5litepod": ("v5e", 1, _TOPO_2D, 16 * GIB),
    "v5e": ("v5e", 1, _TOPO_2D, 16 * GIB),
    "v6e": ("v6e", 1, _TOPO_2D, 32 * GIB),
}

# Reference meshes of the partition-spec golden (128 devices = one v5p-256 slice).
GOLDEN_CONFIG = "chatrex_7b:stage2"
GOLDEN_MESHES = {
    "fsdp128": {"data": 1, "fsdp": 128, "tensor": 1},
    "data2_fsdp16_tensor4": {"data": 2, "fsdp": 16, "tensor": 4},
}
QUICK_CONFIG = "chatrex_tiny:stage2"
QUICK_OVERRIDES = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "data.batch_size=8",
                   "data.seq_len=32", "data.max_objects=4")
QUICK_VOCAB = 256


class AOTError(UserError, RuntimeError):
  """A configuration that cannot be checked on the target (e.g. no devices for it)."""


class TopologyError(UserError, ValueError):
  """A topology name this tool does not know."""


OPT_STATE_REPLICATED = (
    "`jax.jit(tx.init)(trainable)` without out_shardings gives the AdamW mu/nu zeros a "
    "REPLICATED sharding (8 bytes x trainable params on every device); the trainer therefore "
    "passes out_shardings = each parameter's sharding (Trainer.opt_state_shardings).")


@dataclasses.dataclass(frozen=True)
class Target:
  """What to compile for."""
  name: str                 # as given
  platform: str             # "tpu" | "cpu"
  num_devices: int          # JAX devices
  topology: Optional[str]   # libtpu topology name, e.g. "v5p:4x4x8" (TPU only)
  hbm_bytes: Optional[int]  # memory per device of the real target (None for cpu:N)


def parse_topology(name: str) -> Target:
  """'v5p-256' | 'v5p:4x4x8' | 'cpu:8' -> Target (see the module docstring for the naming)."""
  m = re.fullmatch(r"cpu[:\-](\d+)", name)
  if m:
    return Target(name, "cpu", int(m.group(1)), None, None)
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)[:=_](\d+(?:x\d+)*)", name)
  if m:
    gen, shape = m.groups()
    hbm = next(v[3] for v in _GENERATIONS.values() if v[0] == gen)
    return Target(name, "tpu", math.prod(int(s) for s in shape.split("x")), f"{gen}:{shape}", hbm)
  m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
  if not m:
    raise TopologyError(f"unknown topology {name!r}: use e.g. v5p-256, v4-128, v5litepod-64, v6e-256, "
                     "v5p:4x4x8 or cpu:8")
  gen, count = m.group(1), int(m.group(2))
  prefix, cores_per_device, table, hbm = _GENERATIONS[gen]
  if count % cores_per_device:
    raise TopologyError(f"{name}: {gen}-N counts TensorCores ({cores_per_device} per chip); N must be even")
  chips = count // cores_per_device
  if chips not in table:
    raise TopologyError(f"{name}: {chips} chips has no standard slice topology; known chip counts "
                     f"{sorted(table)} (or pass a libtpu name like {prefix}:AxBxC)")
  return Target(name, "tpu", chips, f"{prefix}:{table[chips]}", hbm)


# ---------------------------------------------------------------------------------------------
# Config and task


def quick_config():
  """The tiny ChatRex (same structure as 7B, fewer blocks), data=2 x fsdp=2 x tensor=2, for CI."""
  config = load_config(QUICK_CONFIG, QUICK_OVERRIDES)
  config.model.llm = {**dict(config.model.llm), "vocab_size": QUICK_VOCAB}
  config.model.clip = {**dict(config.model.clip), "num_hidden_layers": 2}
  config.model.convnext = {**dict(config.model.convnext), "depths": [1, 1, 1, 1]}
  config.model.scan_layers = True   # as the 7B config
  return config


# Cheaper CPU code generation for --quick (the memory analysis is CPU-only there anyway).
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _rules(config):
  from chatrex_jax.train import sharding as sharding_lib
  return [tuple(r) for r in config.get("logical_rules", sharding_lib.FSDP_RULES)]


def _mesh_sizes(config, num_devices: int) -> dict:
  """config.mesh with -1 resolved for `num_devices` (`sharding.mesh_sizes`)."""
  from chatrex_jax.train.sharding import mesh_sizes
  m = config.mesh
  sizes = mesh_sizes(m.get("data", 1), m.get("fsdp", -1), m.get("tensor", 1), num_devices)
  return dict(zip(("data", "fsdp", "tensor"), sizes))


# ---------------------------------------------------------------------------------------------
# Partition specs (mesh-free; the golden)


def _spec_to_json(spec) -> list:
  """PartitionSpec -> JSON list: None | "axis" | ["axis", ...] per dimension."""
  return [list(a) if isinstance(a, tuple) else a for a in spec]


def _axes_size(entry, mesh_sizes: dict) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, (list, tuple)) else (entry,)
  return math.prod(mesh_sizes[n] for n in names)


def partition_specs(config, meshes: Optional[dict] = None) -> dict:
  """Every parameter of the config's model -> shape, dtype, logical axes, mesh PartitionSpec.

  Mesh-free (logical rules -> mesh axes, `jax.eval_shape` only). For each reference mesh in
  `meshes` ({name: {"data": d, "fsdp": f, "tensor": t}}) also: the parameters whose dimension
  is not divisible by the mesh axes that shard it, and the per-device parameter bytes.
  Returns a JSON-able dict (the golden file's content).
  """
  import flax.linen as nn
  from jax.sharding import PartitionSpec
  import numpy as np

  from chatrex_jax.convert.mapping import flatten
  from chatrex_jax.train import optimizer as opt_lib
  from chatrex_jax.train.main import build_task

  task = build_task(config)
  abstract = task.abstract_params()
  rules = _rules(config)
  logical = flatten(nn.get_partition_spec(abstract))
  shapes = flatten(nn.unbox(abstract))
  mask = flatten(opt_lib.trainable_mask(nn.unbox(abstract), task.trainable_patterns(),
                                        task.frozen_patterns()))
  params = {}
  for path in sorted(shapes):
    leaf, names = shapes[path], logical[path]
    if names is None:  # an unannotated parameter: replicated
      names = PartitionSpec()
    spec = nn.logical_to_mesh_axes(names, rules)
    spec = list(spec) + [None] * (len(leaf.shape) - len(spec))
    params[path] = {"shape": list(leaf.shape), "dtype": str(leaf.dtype),
                    "logical": list(names) + [None] * (len(leaf.shape) - len(names)),
                    "spec": _spec_to_json(spec), "trainable": bool(mask[path])}
  per_mesh = {}
  for name, sizes in (meshes or {}).items():
    # As sharding.logical_shardings: a dimension its mesh axes do not divide is replicated.
    indivisible, nbytes, replicated_large = [], 0, []
    for path, p in params.items():
      shard = []
      for dim, entry in zip(p["shape"], p["spec"]):
        k = _axes_size(entry, sizes)
        if dim % k:
          indivisible.append(path)
          k = 1
        shard.append(dim // k)
      nbytes += math.prod(shard) * np.dtype(p["dtype"]).itemsize
      if math.prod(p["shape"]) > 1_000_000 and math.prod(shard) == math.prod(p["shape"]):
        replicated_large.append(path)
    per_mesh[name] = {"mesh": dict(sizes), "indivisible": sorted(set(indivisible)),
                      "replicated_large": replicated_large, "param_bytes_per_device": nbytes}
  return {"rules": [[r[0], _spec_to_json([r[1]])[0]] for r in rules],
          "num_params": int(sum(math.prod(p["shape"]) for p in params.values())),
          "meshes": per_mesh, "params": params}


def golden_specs() -> dict:
  """The partition-spec golden for `GOLDEN_CONFIG` on `GOLDEN_MESHES`."""
  config = load_config(GOLDEN_CONFIG)
  out = partition_specs(config, GOLDEN_MESHES)
  out["config"] = GOLDEN_CONFIG
  return out


def dump_golden(golden: dict) -> str:
  """JSON with one line per parameter (readable diffs in review)."""
  head = {k: v for k, v in golden.items() if k != "params"}
  body = ",\n".join(f"  {json.dumps(p)}: {json.dumps(v, sort_keys=True)}"
                    for p, v in sorted(golden["params"].items()))
  text = json.dumps(head, indent=1, sort_keys=True)
  return text[:-2] + ',\n "params": {\n' + body + "\n }\n}\n"


def diff_specs(expected: dict, actual: dict) -> list[str]:
  """Readable differences between two `partition_specs` results (empty when identical)."""
  lines = []
  ep, ap = expected["params"], actual["params"]
  for path in sorted(set(ep) - set(ap)):
    lines.append(f"removed  {path} {ep[path]['shape']} {ep[path]['spec']}")
  for path in sorted(set(ap) - set(ep)):
    lines.append(f"added    {path} {ap[path]['shape']} {ap[path]['spec']}")
  for path in sorted(set(ep) & set(ap)):
    for key in ("shape", "dtype", "logical", "spec", "trainable"):
      if ep[path][key] != ap[path][key]:
        lines.append(f"changed  {path} {key}: {ep[path][key]} -> {ap[path][key]}")
  for key in ("rules", "num_params", "meshes"):
    if expected.get(key) != actual.get(key):
      lines.append(f"changed  [{key}]: {json.dumps(expected.get(key))[:300]} -> "
                   f"{json.dumps(actual.get(key))[:300]}")
  return lines


# ---------------------------------------------------------------------------------------------
# Abstract train state and compilation


def target_devices(target: Target, backend: str = "auto"):
  """(devices, path, note) for the target; raises if the CPU path lacks devices."""
  import jax
  note = ""
  if target.platform == "tpu" and backend in ("auto", "tpu"):
    try:
      from jax.experimental import topologies
      # Compile-only devices touch no chip: let libtpu load beside another process using it.
      os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
      topo = topologies.get_topology_desc(target.topology, "tpu")
      devices = list(topo.devices)
      if len(devices) != target.num_devices:
        raise AOTError(f"{target.topology}: libtpu made {len(devices)} devices, expected "
                       f"{target.num_devices}")
      return devices, "tpu-topology", f"libtpu compile-only devices ({devices[0].device_kind})"
    except AOTError:
      raise
    except Exception as e:  # no libtpu, or libtpu refused the name
      if backend == "tpu":
        raise AOTError(f"TPU topology {target.topology!r} unavailable: {type(e).__name__}: "
                       f"{str(e)[:300]} (install libtpu: pip install 'jax[tpu]')") from e
      note = f"TPU topology unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
  cpus = jax.devices("cpu")
  if len(cpus) < target.num_devices:
    raise AOTError(f"need {target.num_devices} CPU devices, this process has {len(cpus)}: set "
                   f"XLA_FLAGS=--xla_force_host_platform_device_count={target.num_devices} "
                   "before jax starts (main() re-executes itself with it)")
  return cpus[:target.num_devices], "cpu-fake-devices", note + (
      f"{target.num_devices} host CPU devices with the target's mesh shape; memory numbers "
      "come from the CPU compiler (indicative only)")


def _dropped_axes(abstract, shardings, rules) -> list[dict]:
  """Parameters whose rules-given mesh axes `logical_shardings` dropped (indivisible dims)."""
  import flax.linen as nn

  from chatrex_jax.convert.mapping import flatten
  logical = flatten(nn.get_partition_spec(abstract))
  shapes, flat_sh = flatten(nn.unbox(abstract)), flatten(shardings)
  out = []
  for path, leaf in shapes.items():
    n = len(leaf.shape)
    want = list(nn.logical_to_mesh_axes(logical[path], rules)) if logical[path] is not None else []
    want = _spec_to_json(want + [None] * (n - len(want)))
    got = _spec_to_json(list(flat_sh[path].spec) + [None] * (n - len(flat_sh[path].spec)))
    if want != got:
      out.append({"path": path, "shape": list(leaf.shape), "rules_spec": want, "spec": got})
  return out


def abstract_train_state(config, mesh, shard_opt_state: bool = True):
  """(task, tx, abstract TrainState with shardings, info) -- nothing is allocated.

  Mirrors `Trainer._state_shardings` + `Trainer.init_state`; the optimizer-state shardings
  are the output shardings of `jax.jit(tx.init)` compiled for the mesh, as in the trainer
  (XLA leaves those zeros REPLICATED: see OPT_STATE_REPLICATED). shard_opt_state=True instead
  gives every optimizer leaf its parameter's sharding (the proposed trainer fix:
  `jax.eval_shape(tx.init, boxed_trainable)` keeps the logical boxes on mu / nu).
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  from chatrex_jax.train import optimizer as opt_lib
  from chatrex_jax.train import sharding as sharding_lib
  from chatrex_jax.train.main import build_task
  from chatrex_jax.train.trainer import TrainState

  task = build_task(config)
  rules = _rules(config)
  abstract = task.abstract_params()
  params = nn.unbox(abstract)
  param_sh = nn.unbox(sharding_lib.logical_shardings(abstract, mesh, rules))
  info = {"replicated_dims": _dropped_axes(abstract, param_sh, rules)}
  mask = opt_lib.trainable_mask(params, task.trainable_patterns(), task.frozen_patterns())
  trainable, frozen = opt_lib.partition(params, mask)
  tr_sh, fr_sh = opt_lib.partition(param_sh, mask)
  tx, _ = opt_lib.make_optimizer(config.optim, group_lrs=task.group_lrs(), params=trainable)

  def sds(a, sh):
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)
  tr_in = jax.tree.map(sds, trainable, tr_sh)
  fr_in = jax.tree.map(sds, frozen, fr_sh)
  t0 = time.perf_counter()
  opt_abstract = jax.eval_shape(tx.init, trainable)
  if shard_opt_state:
    boxed_trainable, _ = opt_lib.partition(abstract, mask)
    opt_boxed = jax.eval_shape(tx.init, boxed_trainable)
    opt_sh = nn.unbox(sharding_lib.logical_shardings(opt_boxed, mesh, rules))
    info["opt_state_shardings"] = "param-matched (as Trainer.init_state)"
  else:
    with jax.set_mesh(mesh):
      opt_sh = jax.jit(tx.init).lower(tr_in).compile().output_shardings
    info["opt_state_shardings"] = "jax.jit(tx.init) output shardings (XLA's choice, replicated)"
  info["opt_init_compile_s"] = time.perf_counter() - t0
  opt_in = jax.tree.map(sds, opt_abstract, opt_sh)
  replicated = NamedSharding(mesh, PartitionSpec())
  rng_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                     trainable=tr_in, frozen=fr_in, opt_state=opt_in,
                     rng=jax.ShapeDtypeStruct(rng_shape.shape, rng_shape.dtype, sharding=replicated))
  return task, tx, state, info


def abstract_batch(config, task, mesh):
  """The global batch the step sees: `mllm_task.MODEL_BATCH_KEYS`, batch axis over (data, fsdp)."""
  import jax
  import jax.numpy as jnp

  from chatrex_jax.models.chatrex import example_batch
  from chatrex_jax.train import sharding as sharding_lib

  d = config.data
  shapes = jax.eval_shape(lambda: example_batch(task.model_config, batch_size=int(d.batch_size),
                                                num_tokens=int(d.seq_len),
                                                max_objects=int(d.max_objects)))
  shapes["labels"] = jax.ShapeDtypeStruct(shapes["token_ids"].shape, jnp.int32)
  from chatrex_jax.train.mllm_task import MODEL_BATCH_KEYS
  missing = set(MODEL_BATCH_KEYS) - set(shapes)
  if missing:
    raise AOTError(f"example_batch lacks the trained keys {sorted(missing)}")
  return {k: jax.ShapeDtypeStruct(shapes[k].shape, shapes[k].dtype,
                                  sharding=sharding_lib.batch_sharding(mesh, len(shapes[k].shape)))
          for k in MODEL_BATCH_KEYS}


def _tree_bytes_per_device(tree) -> tuple[int, int]:
  """(per-device bytes, global bytes) of ShapeDtypeStructs with shardings."""
  import jax
  import numpy as np
  per, total = 0, 0
  for x in jax.tree.leaves(tree):
    itemsize = np.dtype(x.dtype).itemsize
    total += math.prod(x.shape) * itemsize
    per += math.prod(x.sharding.shard_shape(x.shape)) * itemsize
  return per, total


def _memory_stats(compiled) -> dict:
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  out = {}
  for name in dir(stats):
    if name.endswith("_in_bytes"):
      value = getattr(stats, name)
      if isinstance(value, int):
        out[name] = value
  return out


def lower_train_step(config, devices, *, shard_opt_state=True):
  """Traces and lowers the trainer's jitted step for `devices` (no compilation).

  Returns (lowered, mesh, state, batch, info); `info["time_s"]` holds the timings so far.
  """
  import flax.linen as nn
  import jax

  from chatrex_jax.train import sharding as sharding_lib
  from chatrex_jax.train.trainer import make_train_step

  sizes = _mesh_sizes(config, len(devices))
  mesh = sharding_lib.make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=devices)
  rules = _rules(config)
  t0 = time.perf_counter()
  task, tx, state, info = abstract_train_state(config, mesh, shard_opt_state)
  batch = abstract_batch(config, task, mesh)
  t_abstract = time.perf_counter() - t0
  step_fn = make_train_step(task, tx, int(config.train.get("grad_accum", 1)))
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  jitted = jax.jit(step_fn, in_shardings=(state_sh, None), out_shardings=(state_sh, None),
                   donate_argnums=(0,))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # as Trainer.train
    t0 = time.perf_counter()
    lowered = jitted.lower(state, batch)
  info["mesh_sizes"] = sizes
  info["time_s"] = {"abstract_state": round(t_abstract, 2),
                    "opt_init_compile": round(info["opt_init_compile_s"], 2),
                    "lower": round(time.perf_counter() - t0, 2)}
  return lowered, mesh, state, batch, info


def compile_train_step(config, target: Target, devices, *, shard_opt_state=True,
                       compiler_options: Optional[dict] = None) -> dict:
  """Lowers and compiles the trainer's jitted step for `devices`; returns the report dict."""
  import jax

  lowered, mesh, state, batch, info = lower_train_step(
      config, devices, shard_opt_state=shard_opt_state)
  sizes = info["mesh_sizes"]
  grad_accum = int(config.train.get("grad_accum", 1))
  t0 = time.perf_counter()
  compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
  info["time_s"]["compile"] = round(time.perf_counter() - t0, 2)

  mem = _memory_stats(compiled)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves((state.trainable, state.frozen)))
  tr_dev, tr_glob = _tree_bytes_per_device(state.trainable)
  fr_dev, fr_glob = _tree_bytes_per_device(state.frozen)
  opt_dev, opt_glob = _tree_bytes_per_device(state.opt_state)
  batch_dev, _ = _tree_bytes_per_device(batch)
  other_dev, _ = _tree_bytes_per_device((state.step, state.rng))
  # Optimizer-state leaves the compiler left replicated although they are large.
  opt_replicated = [
      "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
      for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
      if math.prod(x.shape) > 1_000_000 and x.sharding.is_fully_replicated]
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  peak = None
  if mem:
    peak = (mem.get("argument_size_in_bytes", 0) + mem.get("output_size_in_bytes", 0)
            - mem.get("alias_size_in_bytes", 0) + mem.get("temp_size_in_bytes", 0)
            + mem.get("generated_code_size_in_bytes", 0))
  d = config.data
  return {
      "target": target.name, "platform": target.platform, "topology": target.topology,
      "num_devices": len(devices), "device_kind": devices[0].device_kind,
      "mesh": sizes, "stage": config.get("stage"), "grad_accum": grad_accum,
      "global_batch": int(d.batch_size), "seq_len": int(d.seq_len), "max_objects": int(d.max_objects),
      "llm_layers": int(config.model.llm["num_hidden_layers"]),
      "scan_layers": bool(config.model.get("scan_layers", False)),
      "remat_policy": config.model.get("remat_policy", "none"),
      "compute_dtype": config.model.get("compute_dtype", "float32"),
      "num_params": int(num_params), "compiler_options": dict(compiler_options or {}),
      "time_s": info["time_s"],
      "memory_analysis_per_device": mem,
      "peak_estimate_bytes_per_device": peak,
      "analytic_bytes_per_device": {"trainable_params": tr_dev, "frozen_params": fr_dev,
                                    "optimizer_state": opt_dev, "total": tr_dev + fr_dev + opt_dev,
                                    "step_and_rng": other_dev, "batch": batch_dev},
      "analytic_bytes_global": {"trainable_params": tr_glob, "frozen_params": fr_glob,
                                "optimizer_state": opt_glob},
      "optimizer_state_replicated_large": opt_replicated,
      "optimizer_state_shardings": info["opt_state_shardings"],
      "replicated_by_divisibility": [x["path"] for x in info["replicated_dims"]],
      "hbm_bytes_per_device": target.hbm_bytes,
      "fits": (None if target.hbm_bytes is None or peak is None else bool(peak <= target.hbm_bytes)),
      "flops_per_step": flops,
      "flops_note": ("per device, from compiled.cost_analysis(); XLA counts a while loop's body "
                     "once, so with scan_layers=True the scanned LLM layers are counted once, "
                     "not num_hidden_layers times"),
  }


def format_report(r: dict) -> str:
  def g(b):
    if not isinstance(b, (int, float)):
      return "n/a"
    return f"{b / GIB:.2f} GiB" if abs(b) >= 0.1 * GIB else f"{b / 2 ** 20:.2f} MiB"
  lines = [f"AOT train-step compile: {r['target']} via {r['path']} ({r['num_devices']} x "
           f"{r['device_kind']}), mesh {r['mesh']}",
           f"  {r['path_note']}",
           f"  stage {r['stage']}, global batch {r['global_batch']} x {r['seq_len']} tokens, "
           f"{r['llm_layers']} LLM layers (scan={r['scan_layers']}, remat={r['remat_policy']}), "
           f"{r['num_params'] / 1e9:.4f} B params, grad_accum {r['grad_accum']}",
           f"  times (s): {r['time_s']}",
           "  per device (compiled.memory_analysis()):"]
  for k, v in r["memory_analysis_per_device"].items():
    lines.append(f"    {k:<40} {g(v)}")
  a = r["analytic_bytes_per_device"]
  lines += [f"  per device (analytic): trainable {g(a['trainable_params'])}, frozen "
            f"{g(a['frozen_params'])}, optimizer {g(a['optimizer_state'])}, total {g(a['total'])}",
            f"  peak estimate (arg + out - alias + temp + code): {g(r['peak_estimate_bytes_per_device'])}"
            f" of {g(r['hbm_bytes_per_device'])} HBM -> fits: {r['fits']}"]
  lines.append(f"  optimizer-state shardings: {r['optimizer_state_shardings']}")
  if r["optimizer_state_replicated_large"]:
    lines.append(f"  WARNING: {len(r['optimizer_state_replicated_large'])} optimizer-state leaves "
                 f"> 1M elements are REPLICATED, e.g. {r['optimizer_state_replicated_large'][:2]}")
  if r["replicated_by_divisibility"]:
    lines.append(f"  NOTE: {len(r['replicated_by_divisibility'])} parameters keep a dimension "
                 "replicated because its mesh axes do not divide it, e.g. "
                 f"{r['replicated_by_divisibility'][:3]}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


def run(config, target: Target, backend: str = "auto", shard_opt_state: bool = True,
        compiler_options: Optional[dict] = None) -> dict:
  """Devices for the target, then `compile_train_step`; the report names the path used."""
  devices, path, note = target_devices(target, backend)
  if path != "cpu-fake-devices":
    compiler_options = None  # the fast options are CPU-backend flags
  report = compile_train_step(config, target, devices, shard_opt_state=shard_opt_state,
                              compiler_options=compiler_options)
  report["path"], report["path_note"] = path, note
  return report


def _reexec_with_cpu_devices(argv: list[str], n: int) -> int:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "chatrex_jax.tools.aot", *argv, "--_child"]
  return subprocess.run(cmd, env=env).returncode


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m chatrex_jax.tools.aot", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", help="NAME[:ARG] or FILE[:ARG], e.g. chatrex_7b:stage2")
  p.add_argument("--topology", default=None, help="v5p-256 | v5p:4x4x8 | cpu:8 ... (default v5p-256; "
                 "--quick: cpu:8)")
  p.add_argument("--backend", choices=("auto", "tpu", "cpu"), default="auto",
                 help="auto: TPU topology if libtpu is importable, else fake CPU devices")
  p.add_argument("--quick", action="store_true", help=f"tiny config ({QUICK_CONFIG}), 8 CPU devices")
  p.add_argument("--report", help="write the report JSON here")
  p.add_argument("--shard-opt-state", dest="shard_opt_state", action="store_true", default=True,
                 help="optimizer-state leaves sharded like their parameters (the trainer's layout; default)")
  p.add_argument("--replicated-opt-state", dest="shard_opt_state", action="store_false",
                 help="leave the optimizer-state shardings to XLA (replicated), to see what that costs")
  p.add_argument("--write-golden", metavar="PATH",
                 help=f"write the partition-spec golden of {GOLDEN_CONFIG} and exit")
  p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
  return p


@command("aot")
def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  argv, overrides = split_overrides(argv)
  args = _parse(argv).parse_args(argv)

  if args.write_golden:
    golden = golden_specs()
    out = pathlib.Path(args.write_golden)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_golden(golden))
    for name, m in golden["meshes"].items():
      print(f"{name}: {len(m['indivisible'])} with an indivisible (replicated) dim, "
            f"{len(m['replicated_large'])} large replicated, "
            f"{m['param_bytes_per_device'] / GIB:.2f} GiB params/device")
    print(f"wrote {len(golden['params'])} parameter specs to {out}")
    return 0

  if args.quick:
    config = quick_config()
    apply_overrides(config, overrides)
    target = parse_topology(args.topology or "cpu:8")
  else:
    if not args.config:
      print("--config FILE[:ARG] is required (or --quick)", file=sys.stderr)
      return 2
    config = load_config(args.config, overrides)
    target = parse_topology(args.topology or "v5p-256")

  # The CPU path needs its device count before jax starts: re-execute when short of devices.
  if not args._child:
    import jax
    want_cpu = target.platform == "cpu" or args.backend == "cpu"
    if not want_cpu and args.backend == "auto":
      try:
        target_devices(target, "tpu")
      except AOTError:
        want_cpu = True
    if want_cpu and len(jax.devices("cpu")) < target.num_devices:
      return _reexec_with_cpu_devices(argv, target.num_devices)

  try:
    report = run(config, target, args.backend, args.shard_opt_state,
                 FAST_CPU_COMPILE if args.quick else None)
  except AOTError as e:
    print(f"AOT check FAILED for {target.name}: {e}", file=sys.stderr)
    if args.report:
      pathlib.Path(args.report).write_text(json.dumps({"target": target.name, "error": str(e)}, indent=1))
    return 1
  print(format_report(report))
  if args.report:
    pathlib.Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
  print(json.dumps({k: report[k] for k in ("target", "path", "num_devices", "mesh", "time_s",
                                           "peak_estimate_bytes_per_device", "fits")}))
  return 0 if report["fits"] in (True, None) else 3


if __name__ == "__main__":
  sys.exit(main())
