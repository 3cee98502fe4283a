"""What every benchmark measures, defined once: median wall time and peak resident memory.

Memory is read from Linux's /proc/self/status: VmRSS (resident now) and VmHWM (the high-water
mark, reset by writing 5 to /proc/self/clear_refs). VmHWM belongs to the address space, so an
exec'd child starts afresh, unlike ru_maxrss, which a forked child inherits from its parent.
Elsewhere `peak_mb` falls back to ru_maxrss and `PeakRSS` samples with psutil.
"""
from __future__ import annotations

import gc
import os
import resource
import statistics
import sys
import threading
import time
from typing import Callable


def median_time(fn: Callable[[], object], repeats: int, *, warmup: bool = False) -> float:
  """Median wall seconds of `repeats` calls (after one untimed call if `warmup`: compilation)."""
  if warmup:
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def kernel_cost(fn: Callable[[], object]) -> tuple[float, int]:
  """One call's (system CPU seconds, minor page faults) in this process. Memory a run maps
  afresh (an allocator returning large buffers to the kernel between calls) shows here: each
  first touch of a 4 kB page is a fault the kernel serves, zeroing the page."""
  before = resource.getrusage(resource.RUSAGE_SELF)
  fn()
  after = resource.getrusage(resource.RUSAGE_SELF)
  return after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt


def status_mb(field: str) -> float:
  """A /proc/self/status memory field ("VmRSS", "VmHWM") in MB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024.0
  raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
  """Resets VmHWM to the current RSS (False where the kernel does not allow it)."""
  gc.collect()
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_mb() -> float:
  """This process's peak resident set in MB: VmHWM, else ru_maxrss."""
  try:
    return status_mb("VmHWM")
  except OSError:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0


def peak_mb(fn: Callable[[], object]) -> float:
  """Runs fn once; (peak RSS during it) - (RSS before it) in MB, nan where VmHWM cannot reset."""
  if not reset_peak():
    return float("nan")
  before = status_mb("VmRSS")
  fn()
  return status_mb("VmHWM") - before


class PeakRSS:
  """Resident-set high-water mark (MB, `.mb`) above the level at entry, sampled every ms: for a
  run that must not reset the process's own VmHWM."""

  def __enter__(self):
    import psutil
    self.proc = psutil.Process(os.getpid())
    self.base = self.peak = self.proc.memory_info().rss
    self.stop = False
    self.thread = threading.Thread(target=self._poll, daemon=True)
    self.thread.start()
    return self

  def _poll(self):
    while not self.stop:
      self.peak = max(self.peak, self.proc.memory_info().rss)
      time.sleep(0.001)

  def __exit__(self, *exc):
    self.stop = True
    self.thread.join()
    self.mb = (self.peak - self.base) / 2**20
