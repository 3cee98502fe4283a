"""Accelerator tables: TPU generations and slice names, per-device memory and peak FLOP/s.

Read by the AOT check (`chatrex_jax.tools.aot`: a slice name -> compile-only devices and the
HBM budget) and by the trainer's MFU (`metrics.peak_flops_per_device`).

Slice names: `v5p-N`, `v4-N` count TensorCores (megacore: 2 per chip, one JAX device per
chip), so v5p-256 = 128 chips = 128 JAX devices, topology 4x4x8; `v5litepod-N`, `v5e-N`,
`v6e-N` count chips (= JAX devices). A raw libtpu topology name (`v5p:4x4x8`) works too, and
`cpu:N` asks for N fake CPU devices.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

from chatrex_jax.errors import UserError

GIB = 1024 ** 3


class TopologyError(UserError, ValueError):
  """A topology name this project does not know."""


# chips -> physical topology (3D torus generations: v4, v5p; 2D: v5e, v6e).
SLICES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
SLICES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
             256: "16x16"}


@dataclasses.dataclass(frozen=True)
class TPUGeneration:
  libtpu_name: str         # prefix of libtpu topology names ("v5e" for v5litepod)
  device_kind: str         # `jax.Device.device_kind` of one chip
  cores_per_device: int    # TensorCores per JAX device, as the slice name counts them
  slices: dict             # chips -> physical topology
  hbm_bytes: int           # per chip (= per JAX device)
  peak_flops: float        # dense bf16 FLOP/s per chip
  hbm_bandwidth: float     # bytes/s per chip
  ici_bandwidth: Optional[float]  # bidirectional inter-chip bytes/s per chip (None: unpublished)


# Public per-chip figures, Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4,
# /v5p, /v5e, /v6e; read 2026-12): peak bf16 TFLOP/s, HBM GiB, HBM GB/s, bidirectional ICI GB/s.
# v4 1200 GB/s HBM, no ICI figure published; v5p 2765 GB/s, ICI 1200 GB/s; v5e 819 GB/s,
# 400 GB/s; v6e 1638 GB/s, 800 GB/s.
GENERATIONS = {
    "v4": TPUGeneration("v4", "TPU v4", 2, SLICES_3D, 32 * GIB, 275e12, 1200e9, None),
    "v5p": TPUGeneration("v5p", "TPU v5", 2, SLICES_3D, 95 * GIB, 459e12, 2765e9, 1200e9),
    "v5litepod": TPUGeneration("v5e", "TPU v5 lite", 1, SLICES_2D, 16 * GIB, 197e12, 819e9, 400e9),
    "v5e": TPUGeneration("v5e", "TPU v5 lite", 1, SLICES_2D, 16 * GIB, 197e12, 819e9, 400e9),
    "v6e": TPUGeneration("v6e", "TPU v6 lite", 1, SLICES_2D, 32 * GIB, 918e12, 1638e9, 800e9),
}

# Dense bf16 FLOP/s per GPU, matched within the device kind ("NVIDIA H100 80GB HBM3").
GPU_PEAK_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def peak_flops(device_kind: str) -> Optional[float]:
  """Peak dense bf16 FLOP/s of one device of this kind, None when unknown."""
  for gen in GENERATIONS.values():
    # Exact: "TPU v5" (v5p) is a prefix of "TPU v5 lite" (v5e).
    if device_kind in (gen.device_kind, f"TPU {gen.libtpu_name}"):
      return gen.peak_flops
  return next((f for name, f in GPU_PEAK_FLOPS.items() if name in device_kind), None)


@dataclasses.dataclass(frozen=True)
class Target:
  """What to compile for."""
  name: str                 # as given
  platform: str             # "tpu" | "cpu"
  num_devices: int          # JAX devices
  topology: Optional[str]   # libtpu topology name, e.g. "v5p:4x4x8" (TPU only)
  hbm_bytes: Optional[int]  # memory per device of the real target (None for cpu:N)
  peak_flops: Optional[float] = None  # dense bf16 FLOP/s per device (None for cpu:N)
  hbm_bandwidth: Optional[float] = None  # bytes/s per device (None for cpu:N)
  ici_bandwidth: Optional[float] = None  # bidirectional inter-chip bytes/s per device


def parse_topology(name: str) -> Target:
  """'v5p-256' | 'v5p:4x4x8' | 'cpu:8' -> Target (see the module docstring for the naming)."""
  m = re.fullmatch(r"cpu[:\-](\d+)", name)
  if m:
    return Target(name, "cpu", int(m.group(1)), None, None)
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)[:=_](\d+(?:x\d+)*)", name)
  if m:
    prefix, shape = m.groups()
    gen = next(g for g in GENERATIONS.values() if g.libtpu_name == prefix)
    return Target(name, "tpu", math.prod(int(s) for s in shape.split("x")), f"{prefix}:{shape}",
                  gen.hbm_bytes, gen.peak_flops, gen.hbm_bandwidth, gen.ici_bandwidth)
  m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
  if not m:
    raise TopologyError(f"unknown topology {name!r}: use e.g. v5p-256, v4-128, v5litepod-64, "
                        "v6e-256, v5p:4x4x8 or cpu:8")
  gen, count = GENERATIONS[m.group(1)], int(m.group(2))
  if count % gen.cores_per_device:
    raise TopologyError(f"{name}: {m.group(1)}-N counts TensorCores ({gen.cores_per_device} per "
                        "chip); N must be even")
  chips = count // gen.cores_per_device
  if chips not in gen.slices:
    raise TopologyError(f"{name}: {chips} chips has no standard slice topology; known chip counts "
                        f"{sorted(gen.slices)} (or pass a libtpu name like {gen.libtpu_name}:AxBxC)")
  return Target(name, "tpu", chips, f"{gen.libtpu_name}:{gen.slices[chips]}", gen.hbm_bytes,
                gen.peak_flops, gen.hbm_bandwidth, gen.ici_bandwidth)
