"""Training metrics: JSONL + TensorBoard event files (tensorboardX, no TensorFlow), MFU."""
from __future__ import annotations

import json
import pathlib
from typing import Mapping, Optional

import jax

from chatrex_jax.train import accelerators


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard events (process 0 only)."""

  def __init__(self, workdir, enabled: Optional[bool] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(v), int(step))

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path) -> list[dict]:
  p = pathlib.Path(path)
  return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def compiled_flops(compiled) -> Optional[float]:
  """FLOPs of one call of a compiled function (XLA cost analysis), None if unavailable."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends have no cost model
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def peak_flops_per_device() -> Optional[float]:
  """Peak dense bf16 FLOP/s of this host's devices, for MFU (`train.peak_flops` overrides)."""
  return accelerators.peak_flops(jax.devices()[0].device_kind)
