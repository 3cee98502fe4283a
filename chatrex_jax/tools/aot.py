"""Ahead-of-time compile check of the train step for a target topology, without the hardware.

  python -m chatrex_jax.tools.aot --config chatrex_7b:stage2 --topology v5p-256 \
      [--correct-loops [--compiled-costs]] [--report out.json] [--config.mesh.fsdp=64 ...]
  python -m chatrex_jax.tools.aot --config upn_train_large --topology v5p-16
  python -m chatrex_jax.tools.aot --quick            # tiny config, 8 fake CPU devices (CI)
  python -m chatrex_jax.tools.aot --write-golden tests/golden/chatrex_7b_partition_specs.json

Any training config works (`config.task` chatrex or upn): the check builds the config's
`chatrex_jax.train.trainer.Trainer` over the target's devices and asks it for what it would run,
ABSTRACTLY (`jax.eval_shape` + `jax.ShapeDtypeStruct`s carrying `NamedSharding`s; no parameter
is ever allocated, so the 7B model costs nothing):

1. Devices of the target. Path "tpu-topology": `jax.experimental.topologies.get_topology_desc`
   builds compile-only TPU devices for the named slice; this needs libtpu importable
   (`pip install "jax[tpu]"`, or the libtpu wheel on PYTHONPATH), no TPU. Path
   "cpu-fake-devices" (fallback, or `--backend cpu`): N host CPU devices
   (`XLA_FLAGS=--xla_force_host_platform_device_count=N`, set in a re-executed subprocess
   before jax starts) with the same number of devices and the same mesh shape. Memory numbers
   of the CPU path come from the CPU compiler (no TPU layouts / fusion / HBM scheduling):
   they are an indication, not a TPU budget.
2. `Trainer.abstract_state()`: the mesh and logical rules of the config, parameter shardings
   (`sharding.logical_shardings` replicates a dimension its mesh axes do not divide: the report
   lists those parameters), the stage mask, the optimizer, and the optimizer state sharded
   like its parameters. `--replicated-opt-state` shows what leaving the optimizer-state
   shardings to XLA would cost (OPT_STATE_REPLICATED).
3. `Trainer.abstract_batch()`: the task's GLOBAL batch of one step (`TrainTask.abstract_batch`),
   batch axis over ("data", "fsdp").
4. `Trainer.lower_train_step(state, batch)`: the jitted step with the trainer's in/out
   shardings and donation, lowered under the mesh and the logical-axis rules; then compiled.
5. Report (JSON, and a readable summary on stdout): path used, devices, mesh, compile time,
   `compiled.memory_analysis()` per device (argument / output / alias / temp / generated
   code), the analytic per-device bytes of parameters + optimizer state (shard shapes of the
   shardings above), the target's HBM per device and whether the estimate fits, FLOPs per
   step from the cost analysis.

Topology names (`chatrex_jax.train.accelerators`): `v5p-N`, `v4-N` count TensorCores
(v5p-256 = 128 chips = 128 JAX devices, topology 4x4x8); `v5litepod-N`, `v5e-N`, `v6e-N` count
chips; a raw libtpu topology name (`v5p:4x4x8`) works too, and `cpu:N` asks for N fake CPU
devices directly.
"""
from __future__ import annotations

import argparse
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
from chatrex_jax.tools import roofline as roofline_lib
from chatrex_jax.train.accelerators import GIB, Target, parse_topology

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

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


OPT_STATE_REPLICATED = (
    "`jax.jit(tx.init)(trainable)` without out_shardings gives the AdamW mu/nu zeros a "
    "REPLICATED sharding (8 bytes x trainable params on every device); the trainer therefore "
    "passes out_shardings = each parameter's sharding (Trainer.opt_state_shardings).")


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
  from chatrex_jax.train import sharding as sharding_lib
  from chatrex_jax.train.main import build_task

  task = build_task(config)
  abstract = task.abstract_params()
  rules = sharding_lib.config_rules(config)
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


def abstract_train_state(config, devices, shard_opt_state: bool = True):
  """(trainer, abstract TrainState with shardings, info) on `devices`; nothing is allocated.

  The state is `Trainer.abstract_state()` (optimizer state sharded like its parameters).
  shard_opt_state=False instead gives the optimizer state the output shardings of
  `jax.jit(tx.init)` compiled for the mesh: what XLA chooses without out_shardings
  (REPLICATED, see OPT_STATE_REPLICATED). info: "replicated_dims" (parameters whose
  indivisible dimensions stay replicated), "opt_state_shardings", "opt_init_compile_s".
  """
  import jax

  from chatrex_jax.train import sharding as sharding_lib
  from chatrex_jax.train.main import build_task
  from chatrex_jax.train.trainer import Trainer

  trainer = Trainer(config, build_task(config), devices=devices)
  state = trainer.abstract_state()
  abstract, param_sh, _, _, _ = trainer.param_layout()
  info = {"replicated_dims": _dropped_axes(abstract, param_sh, trainer.rules),
          "opt_state_shardings": "param-matched (as Trainer.init_state)", "opt_init_compile_s": 0.0}
  if not shard_opt_state:
    t0 = time.perf_counter()
    with jax.set_mesh(trainer.mesh):
      opt_sh = jax.jit(trainer.tx.init).lower(state.trainable).compile().output_shardings
    state = state.replace(opt_state=sharding_lib.with_shardings(state.opt_state, opt_sh))
    info["opt_state_shardings"] = "jax.jit(tx.init) output shardings (XLA's choice, replicated)"
    info["opt_init_compile_s"] = time.perf_counter() - t0
  return trainer, state, info


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
  """Lowers the trainer's jitted step for `devices` (no compilation): the abstract state and
  the task's global batch through `Trainer.lower_train_step`, as `Trainer.train` does.

  Returns (lowered, trainer, state, batch, info); `info["time_s"]` holds the timings so far.
  """
  t0 = time.perf_counter()
  trainer, state, info = abstract_train_state(config, devices, shard_opt_state)
  batch = trainer.abstract_batch()
  t_abstract = time.perf_counter() - t0 - info["opt_init_compile_s"]
  t0 = time.perf_counter()
  lowered = trainer.lower_train_step(state, batch)
  info["time_s"] = {"abstract_state": round(t_abstract, 2),
                    "opt_init_compile": round(info["opt_init_compile_s"], 2),
                    "lower": round(time.perf_counter() - t0, 2)}
  return lowered, trainer, state, batch, info


def _hbm_exhausted(error: Exception) -> Optional[dict]:
  """The TPU compiler refuses a program larger than HBM: {"message", "used_bytes"} from its
  "Used 101.2G of 95.00G hbm" line, or None for any other error."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
  m = re.search(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm", text)
  used = float(m.group(1)) * units[m.group(2)] if m else None
  lines = text.splitlines()
  line = next((ln for ln in lines if "Used" in ln),
              next((ln for ln in lines if "RESOURCE_EXHAUSTED" in ln), text))
  return {"message": line.strip()[:500], "used_bytes": used}


def model_flops_per_device(trainer, batch, num_devices: int) -> Optional[float]:
  """The task's model FLOPs (PaLM's MFU count) of one global batch with every token real."""
  import numpy as np
  if "attention_mask" not in batch:
    return None
  mask = batch["attention_mask"]
  flops = trainer.task.model_flops({"attention_mask": np.ones(mask.shape, np.int32)})
  return None if flops is None else float(flops) / num_devices


def compile_train_step(config, target: Target, devices, *, shard_opt_state=True,
                       compiler_options: Optional[dict] = None,
                       correct_loops: bool = False, compiled_costs: bool = False) -> dict:
  """Lowers and compiles the trainer's jitted step for `devices`; returns the report dict.

  correct_loops: count the program's FLOPs whole (`roofline.program_cost` of the step lowered
  with every layer in the program, `roofline.whole_program_config`; seconds) and give the
  roofline bound. compiled_costs: also correct the compiled program's own figures (bytes
  accessed, XLA's time estimate) with three reduced *compiles* (minutes). A program the TPU
  compiler finds larger than HBM gives a report with fits=False and its message."""
  import jax

  lowered, trainer, state, batch, info = lower_train_step(
      config, devices, shard_opt_state=shard_opt_state)
  t0 = time.perf_counter()
  exhausted = None
  try:
    compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
  except Exception as e:  # jaxlib's XlaRuntimeError; anything but HBM exhaustion re-raised
    exhausted = _hbm_exhausted(e)
    if exhausted is None:
      raise
    compiled = None
  info["time_s"]["compile"] = round(time.perf_counter() - t0, 2)

  mem = _memory_stats(compiled) if compiled is not None else {}
  # Pallas kernels in the compiled program (Mosaic custom calls): the flash attention's, on TPU.
  kernels = (roofline_lib.declared_kernel_costs(compiled.as_text())
             if compiled is not None else None)
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
  grad_accum = int(config.train.get("grad_accum", 1))
  cost = roofline_lib.cost_of(compiled) if compiled is not None else {}
  n = len(devices)
  program = roofline_lib.program_cost(lowered, n)
  program_corrected, correction = {}, None
  looped = correct_loops and config.task == "chatrex"
  if looped and program:
    t0 = time.perf_counter()
    whole = lower_train_step(roofline_lib.whole_program_config(config), devices,
                             shard_opt_state=shard_opt_state)[0]
    program_corrected = roofline_lib.corrected_cost(roofline_lib.program_cost(whole, n), None,
                                                    grad_accum)
    info["time_s"]["whole_program_lowering"] = round(time.perf_counter() - t0, 2)
  if looped and compiled_costs and compiled is not None:
    t0 = time.perf_counter()
    def reduced_cost(c):
      low = lower_train_step(c, devices, shard_opt_state=shard_opt_state)[0]
      return roofline_lib.cost_of(low.compile(compiler_options) if compiler_options else low.compile())
    correction = roofline_lib.loop_correction(config, reduced_cost)
    info["time_s"]["loop_correction_compiles"] = round(time.perf_counter() - t0, 2)
  corrected = roofline_lib.corrected_cost(cost, correction, grad_accum) if cost else {}
  model_flops = model_flops_per_device(trainer, batch, n)
  collective = roofline_lib.fsdp_collective_bytes(
      state, 2 if config.model.get("compute_dtype", "float32") == "bfloat16" else 4)
  bound = (roofline_lib.roofline(program_corrected, corrected if correction else None,
                                 model_flops or 0.0, target, collective)
           if program_corrected and target.peak_flops else None)
  peak = None
  if mem:
    peak = (mem.get("argument_size_in_bytes", 0) + mem.get("output_size_in_bytes", 0)
            - mem.get("alias_size_in_bytes", 0) + mem.get("temp_size_in_bytes", 0)
            + mem.get("generated_code_size_in_bytes", 0))
  if exhausted is not None:
    fits = False
  elif target.hbm_bytes is None or peak is None:
    fits = None
  else:
    # The TPU compiler's own peak (it plans every HBM buffer) when it reports one.
    fits = bool(mem.get("peak_memory_in_bytes", peak) <= target.hbm_bytes)
  model, data = config.model, config.data
  return {
      "target": target.name, "platform": target.platform, "topology": target.topology,
      "num_devices": len(devices), "device_kind": devices[0].device_kind,
      "mesh": dict(trainer.mesh.shape), "task": config.task, "stage": config.get("stage"),
      "base": model.get("base"),
      "grad_accum": grad_accum,
      "global_batch": int(next(iter(batch.values())).shape[0]),
      "batch": {k: [list(x.shape), str(x.dtype)] for k, x in batch.items()},
      # The MLLM's sizes (None for UPN).
      "seq_len": data.get("seq_len"), "max_objects": data.get("max_objects"),
      "llm_layers": (model.get("llm") or {}).get("num_hidden_layers"),
      "scan_layers": bool(model.get("scan_layers", False)),
      "remat_policy": model.get("remat_policy", "none"),
      "attention_impl": model.get("attention_impl", "auto"),
      "dwconv_impl": (model.get("convnext") or {}).get("dwconv_impl", "auto"),
      "pallas_kernels": kernels and kernels["kernels"], "pallas_declared_cost": kernels,
      "loss_chunks": model.get("loss_chunks"),
      "compute_dtype": model.get("compute_dtype", "float32"),
      "num_params": int(num_params), "compiler_options": dict(compiler_options or {}),
      "time_s": info["time_s"],
      "memory_analysis_per_device": mem,
      "peak_estimate_bytes_per_device": peak,
      "hbm_exhausted": exhausted,
      "analytic_bytes_per_device": {"trainable_params": tr_dev, "frozen_params": fr_dev,
                                    "optimizer_state": opt_dev, "total": tr_dev + fr_dev + opt_dev,
                                    "step_and_rng": other_dev, "batch": batch_dev},
      "analytic_bytes_global": {"trainable_params": tr_glob, "frozen_params": fr_glob,
                                "optimizer_state": opt_glob},
      "optimizer_state_replicated_large": opt_replicated,
      "optimizer_state_shardings": info["opt_state_shardings"],
      "replicated_by_divisibility": [x["path"] for x in info["replicated_dims"]],
      "hbm_bytes_per_device": target.hbm_bytes,
      "peak_flops_per_device": target.peak_flops,
      "fits": fits,
      "cost_reported_per_device": cost,
      "loop_correction": correction,
      "cost_per_device": corrected,
      "program_cost_reported_per_device": program,
      "program_cost_per_device": program_corrected,
      "collective_bytes_per_device_estimate": collective,
      "roofline": bound,
      "flops_per_step": (program_corrected or corrected or cost).get("flops", float("nan")),
      "flops_note": ("per device: the traced program's FLOPs (before XLA's optimizations, global "
                     "/ devices) with every scanned layer and loss chunk counted "
                     "(tools/roofline.py)" if program_corrected else
                     "per device, from compiled.cost_analysis() as reported: a while loop's body "
                     "is counted once, so scanned layers and loss chunks are under-counted "
                     "(--correct-loops counts them)"),
  }


def format_report(r: dict) -> str:
  def g(b):
    if not isinstance(b, (int, float)):
      return "n/a"
    return f"{b / GIB:.2f} GiB" if abs(b) >= 0.1 * GIB else f"{b / 2 ** 20:.2f} MiB"
  batch = (f"{r['global_batch']} x {r['seq_len']} tokens" if r.get("seq_len") else
           ", ".join(f"{k} {shape}" for k, (shape, _) in r["batch"].items()))
  llm = (f"{r['llm_layers']} LLM layers (scan={r['scan_layers']}, remat={r['remat_policy']}, "
         f"attention={r.get('attention_impl', 'auto')}), "
         if r.get("llm_layers") else "")
  lines = [f"AOT train-step compile: {r['target']} via {r['path']} ({r['num_devices']} x "
           f"{r['device_kind']}), mesh {r['mesh']}",
           f"  {r['path_note']}",
           f"  {r['task']} {r['stage'] or ''}".rstrip() + f", global batch {batch}, {llm}"
           f"{r['num_params'] / 1e9:.4f} B params, grad_accum {r['grad_accum']}",
           f"  times (s): {r['time_s']}",
           "  per device (compiled.memory_analysis()):"]
  for k, v in r["memory_analysis_per_device"].items():
    lines.append(f"    {k:<40} {g(v)}")
  a = r["analytic_bytes_per_device"]
  lines += [f"  per device (analytic): trainable {g(a['trainable_params'])}, frozen "
            f"{g(a['frozen_params'])}, optimizer {g(a['optimizer_state'])}, total {g(a['total'])}",
            f"  peak: XLA {g(r['memory_analysis_per_device'].get('peak_memory_in_bytes'))}, sum (arg + "
            f"out - alias + temp + code) {g(r['peak_estimate_bytes_per_device'])} of "
            f"{g(r['hbm_bytes_per_device'])} HBM -> fits: {r['fits']}"]
  if r.get("hbm_exhausted"):
    lines.append(f"  the TPU compiler ran out of HBM: {r['hbm_exhausted']['message']}")
  c = r.get("cost_per_device") or {}
  if c:
    lines.append(f"  compiled cost per device ({'loops corrected' if r.get('loop_correction') else 'as reported'}):"
                 f" {c.get('flops', float('nan')) / 1e12:.3g} TFLOP, "
                 f"{c.get('bytes accessed', float('nan')) / GIB:.3g} GiB accessed"
                 + (f", XLA estimate {c['optimal_seconds']:.3g} s" if "optimal_seconds" in c else ""))
  pc = r.get("program_cost_per_device") or {}
  if pc:
    lines.append(f"  program FLOPs per device, every layer and chunk counted: {pc['flops'] / 1e12:.3g} TFLOP")
  b = r.get("roofline")
  if b:
    t = lambda v: "n/a" if v is None else f"{v * 1e3:.3g} ms"
    pct = lambda v: "n/a" if v is None else f"{100 * v:.0f}%"
    lines.append(f"  roofline: compute {t(b['t_compute_s'])}, HBM {t(b['t_hbm_s'])}, ICI (FSDP "
                 f"estimate) {t(b['t_ici_s'])} -> step >= {t(b['step_time_bound_s'])} "
                 f"({b['bound_by']}-bound), MFU <= {pct(b['mfu_bound'])}, HFU <= {pct(b['hfu_bound'])}")
    if b.get("compiled_note"):
      lines.append(f"  {b['compiled_note']}")
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
        compiler_options: Optional[dict] = None, correct_loops: bool = False,
        compiled_costs: bool = False) -> dict:
  """Devices for the target, then `compile_train_step`; the report names the path used."""
  devices, path, note = target_devices(target, backend)
  if path != "cpu-fake-devices":
    compiler_options = None  # the fast options are CPU-backend flags
  if path == "tpu-topology":
    _select_tpu_kernels(config)
  report = compile_train_step(config, target, devices, shard_opt_state=shard_opt_state,
                              compiler_options=compiler_options, correct_loops=correct_loops,
                              compiled_costs=compiled_costs)
  report["path"], report["path_note"] = path, note
  return report


def _select_tpu_kernels(config) -> None:
  """What the "auto" choices pick on a TPU host, for a compile from a CPU host (where the
  backend, and so "auto", says CPU): the Pallas flash-attention kernel where it blocks the
  length, and ConvNeXt's depthwise conv as XLA's grouped convolution (not the CPU's shifts)."""
  from chatrex_jax.ops import tpu_flash_attention
  model, seq_len = config.model, config.data.get("seq_len")
  with config.unlocked():
    if seq_len and model.get("attention_impl", "auto") == "auto":   # the MLLM (UPN has no LLM)
      model.attention_impl = ("pallas_tpu" if tpu_flash_attention.supported(int(seq_len))
                              else "xla")
    convnext = model.get("convnext")
    if convnext is not None and convnext.get("dwconv_impl", "auto") == "auto":
      model.convnext = {**dict(convnext), "dwconv_impl": "conv"}


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
  p.add_argument("--correct-loops", action="store_true",
                 help="count every scanned layer and loss chunk of the program (three reduced "
                      "lowerings) and print the roofline bound on the step time")
  p.add_argument("--compiled-costs", action="store_true",
                 help="with --correct-loops: also correct the compiled program's bytes accessed "
                      "and XLA's time estimate (three reduced compiles: minutes)")
  p.add_argument("--write-golden", metavar="PATH",
                 help=f"write the partition-spec golden of {GOLDEN_CONFIG} and exit")
  p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
  return p


@command("aot")
def main(argv=None) -> int:
  full_argv = list(sys.argv[1:] if argv is None else argv)
  argv, overrides = split_overrides(full_argv)
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
      return _reexec_with_cpu_devices(full_argv, target.num_devices)  # overrides included

  try:
    report = run(config, target, args.backend, args.shard_opt_state,
                 FAST_CPU_COMPILE if args.quick else None, correct_loops=args.correct_loops,
                 compiled_costs=args.compiled_costs)
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
