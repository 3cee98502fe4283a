"""Training metrics: JSONL + TensorBoard event files (tensorboardX, no TensorFlow), MFU."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Mapping, Optional

import jax

from chatrex_jax import storage
from chatrex_jax.train import accelerators


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard events (process 0 only).

  An object-store workdir (gs://...) has no append: the rows (with those of earlier runs of a
  resumed workdir) are rewritten as one object at every write, and the TensorBoard events are
  written to a local folder and uploaded to `<workdir>/tensorboard` with it.
  """

  def __init__(self, workdir, enabled: Optional[bool] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = storage.path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self.remote = storage.is_remote(workdir)
    self._tb = None
    self._staging = None
    if self.enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter
      # Event files are named by second and host; a resumed run in the same second must not
      # overwrite the earlier run's file (in a bucket it would replace the whole object).
      suffix = f".{os.getpid()}.{time.time_ns() % 10**9}"
      if self.remote:
        self._rows = self.path.read_text() if self.path.exists() else ""
        self._staging = pathlib.Path(tempfile.mkdtemp(prefix="chatrex_tensorboard_"))
        self._tb = SummaryWriter(str(self._staging), filename_suffix=suffix)
      else:
        self._tb = SummaryWriter(str(self.workdir / "tensorboard"), filename_suffix=suffix)

  def write(self, step: int, scalars: Mapping[str, float]):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    line = json.dumps(row) + "\n"
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(v), int(step))
    if self.remote:   # objects are written whole: the file so far, then the event files
      self._rows += line
      self.path.write_text(self._rows)
      self._upload_events()
    else:
      with open(self.path, "a") as f:
        f.write(line)

  def _upload_events(self):
    self._tb.flush()
    (self.workdir / "tensorboard").mkdir(parents=True, exist_ok=True)
    for f in self._staging.iterdir():
      (self.workdir / "tensorboard" / f.name).write_bytes(f.read_bytes())

  def flush(self):
    if self._tb is not None:
      self._tb.flush()
      if self.remote:
        self._upload_events()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      if self.remote:
        self._upload_events()
        shutil.rmtree(self._staging, ignore_errors=True)
      self._tb = None


def read_jsonl(path) -> list[dict]:
  p = storage.path(path)
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
