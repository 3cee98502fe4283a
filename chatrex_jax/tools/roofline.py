"""FLOPs and bytes of a compiled train step counted whole, and the roofline bound on its time.

Cost analysis counts the body of a while loop once, whatever its trip count. A train step has
two such loops on its hot path: the scanned LLM layers (`scan_layers=True`, counted as one
layer of `num_hidden_layers`) and the fused LM head + cross-entropy (`loss_chunks` chunks,
counted as one); the TPU compiler may add loops of its own (windowed einsums that overlap the
FSDP gathers with the matmuls), counted once too. Two counts, then:

- The program's FLOPs (`program_cost` of `whole_program_config`): the step traced with the
  layer scan unrolled and the loss in one chunk (same math), counted by XLA's HLO cost
  analysis before any optimisation, global over devices. Every layer is in that program and
  the compiler has added nothing: this is the FLOP count the roofline uses.
- The compiled program's own figures (bytes accessed, and on TPU XLA's `optimal_seconds`),
  corrected by `loop_correction` with three reduced compiles of the same step on the same
  devices, the vision towers cut to a block each (they cancel out):

      R(layers, chunks)  per-device cost of that reduced step, its layers scanned as configured
      U(0)               the reduced step with no LLM layer at all
      one iteration = R(2, 1) - U(0)           (the loop body as the real step runs it)
      head missed   = R(2, 1) - R(2, chunks)
      corrected     = reported + (num_hidden_layers - 1) x one iteration + head missed

  The iteration is measured in the loop: a rolled layer re-does a little elementwise work
  that unrolled layers share (3-6% of a tiny layer's FLOPs). Where the compiler added loops
  of its own, the corrected compiled FLOPs fall short of the program's and `roofline` leaves
  the compiled figures out. The towers' small loops (ConvNeXt row chunks under `lax.map`,
  RoI-align sampling) stay counted once in the compiled figures: under 1% of a 7B step.

`roofline` turns the counts into lower bounds on the step time, each resource at its public
peak (`train.accelerators`): the program's FLOPs at the chip's dense bf16 throughput, the
compiled bytes accessed at its HBM bandwidth, and the FSDP collectives' bytes
(`fsdp_collective_bytes`) at its inter-chip bandwidth. With perfect overlap the step takes the
largest of the three; the MFU that bound allows is the model FLOPs (PaLM's count,
`TrainTask.model_flops`) over that time at peak. A bound below 50% rules a configuration out;
one above says only that nothing in the program itself forbids it.
"""
from __future__ import annotations

import copy
import math
import re
from typing import Optional

COST_KEYS = ("flops", "bytes accessed", "transcendentals", "optimal_seconds")


def cost_of(compiled) -> dict:
  """The whole-program figures of `compiled.cost_analysis()` (missing ones omitted)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return {k: float(cost[k]) for k in COST_KEYS if cost and k in cost}


def reduced_config(config, layers: int, chunks: int, scan: Optional[bool] = None):
  """The step with `layers` LLM layers (scanned as configured, or as `scan` says) and its loss
  in `chunks` chunks, the vision towers cut to their smallest depth; sizes, batch, mesh, dtype
  and remat unchanged."""
  c = copy.deepcopy(config)
  c.model.llm = {**dict(c.model.llm), "num_hidden_layers": layers}
  c.model.clip = {**dict(c.model.clip), "num_hidden_layers": 2}   # select_layer=-2 needs 2
  c.model.convnext = {**dict(c.model.convnext), "depths": [1] * len(c.model.convnext["depths"])}
  if scan is not None:
    c.model.scan_layers = scan
  c.model.loss_chunks = chunks
  return c


def whole_program_config(config):
  """The same step with every loop iteration in the program: the scan over the LLM layers
  unrolled (`scan_unroll` = layers), the loss in one chunk, and the attention in XLA ops
  (`attention_impl="xla"`). Same math, same FLOPs; its traced program's cost analysis counts
  every layer (`program_cost`). A Pallas kernel is a custom call that cost analysis counts as
  nothing (the flash attention's forward, recomputed forward and two backward kernels: about 4%
  of a 7B step), so the count takes the attention's blocked-causal XLA form, which does the
  kernel's arithmetic on the blocks the causal mask leaves."""
  c = copy.deepcopy(config)
  if c.model.get("scan_layers", False):
    c.model.scan_unroll = int(c.model.llm["num_hidden_layers"])
  c.model.loss_chunks = 1
  if "attention_impl" in c.model:
    c.model.attention_impl = "xla"
  return c


_ESTIMATE = re.compile(r'cost_estimate\\?"\s*:\s*\{([^}]*)\}')
# Lowered text escapes the quotes; compiled text re-serialises the numbers as JSON strings.
_ESTIMATE_FIELD = re.compile(r'(flops|transcendentals|bytes_accessed)\\?"\s*:\s*(?:\\?")?(\d+)')


def declared_kernel_costs(hlo_text: str) -> dict:
  """The Pallas (Mosaic) kernels in a compiled program's HLO text and the costs they declare
  (`pl.CostEstimate`, which XLA's TPU cost model uses to time them): {"kernels": n,
  "with_estimate": m, "flops": ..., "transcendentals": ..., "bytes_accessed": ...}, summed over
  the kernels as they appear in the text (a kernel inside a loop body once). jax's flash
  attention declares its forward kernel only; its backward kernels declare nothing."""
  kernels = hlo_text.count('custom_call_target="tpu_custom_call"')
  totals = {"flops": 0.0, "transcendentals": 0.0, "bytes_accessed": 0.0}
  found = _ESTIMATE.findall(hlo_text)
  for body in found:
    for key, value in _ESTIMATE_FIELD.findall(body):
      totals[key] += float(value)
  return {"kernels": kernels, "with_estimate": len(found), **totals}


def loop_correction(config, compile_cost) -> dict:
  """What `cost_analysis` misses in the config's step, per figure (see the module docstring).

  compile_cost(config) -> cost dict of that config's step compiled on the target's devices.
  Returns {"per_layer": {...}, "head_missed": {...}, "missed": {...}, "layers": L,
  "chunks": k, "compiles": n}; "missed" is what to add to the reported figures.
  """
  layers = int(config.model.llm["num_hidden_layers"])
  chunks = int(config.model.get("loss_chunks", 0) or 0)
  scanned = bool(config.model.get("scan_layers", False))
  r2 = compile_cost(reduced_config(config, 2, 1))
  compiles = 1
  zero = {k: 0.0 for k in r2}
  per_layer = head_missed = zero
  if scanned and layers > 1:
    u0 = compile_cost(reduced_config(config, 0, 1, scan=False))
    per_layer = {k: r2[k] - u0[k] for k in r2}
    compiles += 1
  if chunks != 1:  # 0 = chunks sized by the vocabulary: also a loop
    r2k = compile_cost(reduced_config(config, 2, chunks))
    head_missed = {k: r2[k] - r2k[k] for k in r2}
    compiles += 1
  multiplier = (layers - 1) if scanned else 0
  missed = {k: multiplier * per_layer[k] + head_missed[k] for k in r2}
  return {"per_layer": per_layer, "head_missed": head_missed, "missed": missed,
          "layers": layers, "chunks": chunks, "scan_layers": scanned, "compiles": compiles}


def corrected_cost(reported: dict, correction: Optional[dict], grad_accum: int = 1) -> dict:
  """Reported + missed, times the micro-steps of a gradient-accumulation scan (whose body,
  the whole forward and backward, is itself counted once; the optimizer update outside it is
  a few FLOPs per parameter and is over-counted by the factor, negligibly)."""
  missed = (correction or {}).get("missed", {})
  return {k: grad_accum * (v + missed.get(k, 0.0)) for k, v in reported.items()}


def fsdp_collective_bytes(state, compute_itemsize: int = 2) -> float:
  """Bytes one device receives per step from the FSDP collectives, estimated from the state's
  shardings: every parameter sharded over k devices is all-gathered twice in the compute dtype
  (forward, and again for the backward pass: remat and the scanned layers gather per layer),
  and a trainable one's gradient is reduce-scattered in float32; each moves (k - 1)/k of the
  full array through the device. Data-parallel replicas add an all-reduce of the gradient
  shards (2 (r - 1)/r of them)."""
  import jax
  import numpy as np

  def per_leaf(x, trainable):
    k = math.prod(x.shape) // max(math.prod(x.sharding.shard_shape(x.shape)), 1)
    size = math.prod(x.shape)
    out = 0.0
    if k > 1:
      out += 2 * size * compute_itemsize * (k - 1) / k
      if trainable:
        out += size * 4 * (k - 1) / k
    replicas = x.sharding.num_devices // k if hasattr(x.sharding, "num_devices") else 1
    if trainable and replicas > 1:
      out += 2 * (size / k) * np.dtype(np.float32).itemsize * (replicas - 1) / replicas
    return out
  total = sum(per_leaf(x, True) for x in jax.tree.leaves(state.trainable))
  total += sum(per_leaf(x, False) for x in jax.tree.leaves(state.frozen))
  return float(total)


def program_cost(lowered, num_devices: int) -> dict:
  """Per-device FLOPs and transcendentals of the lowered (traced, not yet optimised) step: XLA's
  HLO cost analysis of the global program on the host CPU client, over the device count.

  The figures the compiled program reports can miss iterations of loops the TPU compiler adds
  itself (windowed einsums overlapping FSDP gathers with matmuls, seen at 4 sequences per v5p
  chip); the traced program has only the model's loops, which `loop_correction` counts. Tensor
  parallelism's few repeated elementwise ops are not in it. {} where jaxlib lacks the call."""
  import jax
  try:
    from jax._src.lib import xla_client
    module = lowered.compiler_ir("hlo").as_hlo_module()
    cost = xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
  except (ImportError, AttributeError):   # a private jaxlib entry point: absent, no count
    return {}
  return {k: float(cost[k]) / num_devices for k in ("flops", "transcendentals") if k in cost}


def roofline(program: dict, compiled: Optional[dict], model_flops: float, target,
             collective_bytes: Optional[float]) -> dict:
  """Lower bounds on the step time per device, and the MFU / HFU they allow.

  program: `program_cost` with loops counted (FLOPs); compiled: the compiled program's
  loop-corrected figures (bytes accessed, XLA's `optimal_seconds`) or None. The compiled
  figures are used only where their FLOPs agree with the program's within 10%: otherwise the
  compiler added loops of its own, counted once, and its bytes and estimate are short too."""
  peak, hbm, ici = target.peak_flops, target.hbm_bandwidth, target.ici_bandwidth
  note = None
  if compiled and program.get("flops"):
    ratio = compiled.get("flops", 0.0) / program["flops"]
    if not 0.9 <= ratio <= 1.1:
      note = (f"the compiled program counts {ratio:.2f}x the traced program's FLOPs after the "
              "loop correction: the TPU compiler added loops of its own, so its bytes accessed "
              "and time estimate are left out")
      compiled = None
  t_compute = program["flops"] / peak if peak else None
  t_hbm = compiled["bytes accessed"] / hbm if compiled and hbm and "bytes accessed" in compiled else None
  t_ici = collective_bytes / ici if ici and collective_bytes is not None else None
  times = {"compute": t_compute, "hbm": t_hbm, "ici": t_ici}
  known = {k: v for k, v in times.items() if v is not None}
  bound = max(known.values()) if known else None
  estimate = (compiled or {}).get("optimal_seconds")
  out = {f"t_{k}_s": v for k, v in times.items()}
  out.update({
      "step_time_bound_s": bound,
      "bound_by": max(known, key=known.get) if known else None,
      "xla_optimal_seconds": estimate,
      "model_flops_per_device": model_flops,
      "mfu_bound": model_flops / (bound * peak) if bound and peak else None,
      "hfu_bound": program["flops"] / (bound * peak) if bound and peak else None,
      "compiled_note": note,
  })
  if estimate and peak:
    out["mfu_at_xla_estimate"] = model_flops / (estimate * peak)
  return out
