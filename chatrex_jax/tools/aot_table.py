"""The AOT table of launch/README.md: every 7B base x stage x documented slice, compiled by the
TPU compiler (libtpu compile-only devices), with whole-program FLOPs and the roofline bound.

  python -m chatrex_jax.tools.aot_table run [--rows stage2-qwen2.5-v5p-256 ...] [--compiled-costs]
  python -m chatrex_jax.tools.aot_table render       # the markdown table on stdout
  python -m chatrex_jax.tools.aot_table list         # rows and their commands

`run` compiles each row in its own process (`python -m chatrex_jax.tools.aot ... --correct-loops
--report DIR/ROW.json`, DIR = launch/aot_reports), skipping rows whose report exists, so an
interrupted run resumes; a 7B row takes 5-10 minutes of compilation on 2 CPU cores and about
11 GB of host memory (`--compiled-costs`: 10-17 minutes more). `render` reads the reports.
The largest per-chip batch is fitted from two compiles of one generation (the same program at
two per-chip batches: v5p-64 and v5p-256 under pure FSDP): XLA's peak = fixed + per-row bytes
x batch, the fixed part corrected for each slice's parameter shards.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
from typing import Optional

from chatrex_jax.train.accelerators import GIB, parse_topology

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO_ROOT / "launch" / "aot_reports"
STAGES = ("stage1", "stage2")
BASES = ("qwen2.5", "vicuna")
SLICES = ("v5p-64", "v5p-256", "v5e-256", "v6e-256")
GLOBAL_BATCH = {"stage1": 256, "stage2": 128}   # chatrex_7b.py's data.batch_size


@dataclasses.dataclass(frozen=True)
class Row:
  stage: str
  base: str
  topology: str
  per_chip_batch: Optional[int] = None   # None: the config's global batch

  @property
  def name(self) -> str:
    tail = f"-b{self.per_chip_batch}" if self.per_chip_batch else ""
    return f"{self.stage}-{self.base}-{self.topology}{tail}"

  def overrides(self) -> list[str]:
    """What a user passes for this slice: the global batch, and a tensor axis where the
    slice has more chips than the global batch has rows (FSDP shards rows, not tokens)."""
    chips = parse_topology(self.topology).num_devices
    batch = self.per_chip_batch * chips if self.per_chip_batch else GLOBAL_BATCH[self.stage]
    out = [f"--config.data.batch_size={batch}"] if self.per_chip_batch else []
    if batch < chips:
      out.append(f"--config.mesh.tensor={chips // batch}")
    return out

  @property
  def config_name(self) -> str:
    return f"chatrex_7b:{self.stage},{self.base}"

  def command(self, report: pathlib.Path, compiled_costs: bool = False) -> list[str]:
    return [sys.executable, "-m", "chatrex_jax.tools.aot", "--config", self.config_name,
            "--topology", self.topology, "--backend", "tpu", "--correct-loops",
            *(["--compiled-costs"] if compiled_costs else []), "--report", str(report),
            *self.overrides()]


def grid() -> list[Row]:
  return [Row(s, b, t) for b in BASES for s in STAGES for t in SLICES]


def parse_row(name: str) -> Row:
  for row in grid():
    if name == row.name:
      return row
    if name.startswith(row.name + "-b") and name[len(row.name) + 2:].isdigit():
      return Row(row.stage, row.base, row.topology, int(name[len(row.name) + 2:]))
  raise SystemExit(f"unknown row {name!r}: `python -m chatrex_jax.tools.aot_table list` names them")


def run(rows: list[Row], out_dir: pathlib.Path, compiled_costs: bool = False) -> int:
  out_dir.mkdir(parents=True, exist_ok=True)
  failed = 0
  for row in rows:
    report = out_dir / f"{row.name}.json"
    if report.exists():
      print(f"{row.name}: report exists, skipped", flush=True)
      continue
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    with open(out_dir / f"{row.name}.log", "w") as log:
      rc = subprocess.run(row.command(report, compiled_costs), stdout=log, stderr=subprocess.STDOUT, env=env,
                          cwd=REPO_ROOT).returncode
    status = {0: "fits", 3: "does not fit"}.get(rc, f"FAILED (exit {rc}, see {row.name}.log)")
    failed += rc not in (0, 3)
    print(f"{row.name}: {status}", flush=True)
  return 1 if failed else 0


# ------------------------------------------------------------------------------------- render

def load(out_dir: pathlib.Path) -> dict[str, dict]:
  return {p.stem: json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))}


def _args_bytes(r: dict) -> float:
  return r["memory_analysis_per_device"].get("argument_size_in_bytes", 0.0)


def _xla_peak(r: dict) -> Optional[float]:
  return r["memory_analysis_per_device"].get("peak_memory_in_bytes")


def batch_fits(reports: dict[str, dict]) -> dict[tuple, dict]:
  """(stage, base, generation) -> {"per_row_bytes", "fixed_bytes"} from the two v5p rows: XLA's
  peak minus the arguments (parameter, optimizer and batch shards, which differ by slice) is
  taken as fixed + per_row x per-chip batch. Only two rows of the same program count: the same
  remat policy and attention (`_program`)."""
  fits = {}
  for stage in STAGES:
    for base in BASES:
      pts, programs = [], set()
      for topo in ("v5p-64", "v5p-256"):
        r = reports.get(Row(stage, base, topo).name)
        if r and _xla_peak(r):
          pts.append((r["global_batch"] / r["num_devices"], _xla_peak(r) - _args_bytes(r)))
          programs.add(_program(r))
      if len(pts) == 2 and pts[0][0] != pts[1][0] and len(programs) == 1:
        (b1, m1), (b2, m2) = pts
        per_row = (m1 - m2) / (b1 - b2)
        fits[(stage, base, "v5p")] = {"per_row_bytes": per_row, "fixed_bytes": m2 - per_row * b2}
  return fits


def max_batch(r: dict, fit: Optional[dict]) -> Optional[int]:
  """Largest per-chip batch whose fitted peak stays within HBM (arguments grow with the batch
  shard only, a few KB per row)."""
  if not fit or fit["per_row_bytes"] <= 0:
    return None
  batch_shard = r["analytic_bytes_per_device"]["batch"]
  per_chip = r["global_batch"] / r["num_devices"]
  fixed_args = _args_bytes(r) - batch_shard
  per_row = fit["per_row_bytes"] + batch_shard / per_chip
  return int((r["hbm_bytes_per_device"] - fixed_args - fit["fixed_bytes"]) // per_row)


def _program(r: dict) -> str:
  """The remat policy and the attention the row compiled (reports before the flash kernel carry
  no attention_impl: the XLA form)."""
  attention = "flash (Pallas)" if r.get("attention_impl") == "pallas_tpu" else "XLA"
  return f"{r.get('remat_policy', 'none')}, {attention}"


def render(reports: dict[str, dict]) -> str:
  fits = batch_fits(reports)
  head = ("| base | stage | slice | chips | mesh (data x fsdp x tensor) | remat, attention | "
          "global batch (per chip) | "
          "XLA peak / HBM per chip | fits | largest per-chip batch | TFLOP/step/chip (compiled "
          "count -> whole program) | step >= (bound) | MFU bound | XLA's estimate | compile |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for row in grid():
    r = reports.get(row.name)
    if r is None:
      lines.append(f"| {row.base} | {row.stage} | {row.topology} | | not compiled yet: "
                   f"`python -m chatrex_jax.tools.aot_table run --rows {row.name}` | | | | | | | | | | |")
      continue
    m = r["mesh"]
    per_chip = r["global_batch"] / r["num_devices"]
    peak = _xla_peak(r)
    hbm = r["hbm_bytes_per_device"]
    mem = (f"{peak / GIB:.1f} / {hbm / GIB:.0f} GiB" if peak else
           (f"needs {r['hbm_exhausted']['used_bytes'] / GIB:.1f} / {hbm / GIB:.0f} GiB"
            if (r.get("hbm_exhausted") or {}).get("used_bytes") else "n/a"))
    gen = r["target"].split("-")[0]
    fit = fits.get((row.stage, row.base, gen))
    best = max_batch(r, fit) if r["fits"] else None
    checked = [x for k, x in reports.items() if k.startswith(row.name + "-b")]
    best_txt = "n/a" if best is None else f"{best} (fit)"
    for c in checked:
      b = c["global_batch"] // c["num_devices"]
      best_txt += f"; {b} compiled: {'fits' if c['fits'] else 'out of HBM'}"
    rep, whole = r.get("cost_reported_per_device") or {}, r.get("program_cost_per_device") or {}
    b = r.get("roofline") or {}
    flops = (f"{rep['flops'] / 1e12:.1f} -> {whole['flops'] / 1e12:.1f}"
             if rep.get("flops") and whole.get("flops") else "n/a")
    bound = "n/a"
    if b.get("step_time_bound_s"):
      bound = f"{b['step_time_bound_s']:.2f} s ({b['bound_by']}" + (
          ")" if b.get("t_hbm_s") is not None else "; HBM n/a)")
    mfu = f"{100 * b['mfu_bound']:.0f}%" if b.get("mfu_bound") else "n/a"
    xla = (f"{b['xla_optimal_seconds']:.2f} s ({100 * b['mfu_at_xla_estimate']:.0f}% MFU)"
           if b.get("xla_optimal_seconds") and b.get("mfu_at_xla_estimate") else "n/a")
    minutes = sum(r["time_s"].values()) / 60
    lines.append(
        f"| {row.base} | {row.stage} | {row.topology} | {r['num_devices']} | "
        f"{m['data']} x {m['fsdp']} x {m['tensor']} | {_program(r)} | "
        f"{r['global_batch']} ({per_chip:g}) | {mem} | "
        f"{'yes' if r['fits'] else 'no'} | {best_txt} | {flops} | {bound} | {mfu} | {xla} | "
        f"{minutes:.0f} min |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m chatrex_jax.tools.aot_table", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("action", choices=("run", "render", "list"))
  p.add_argument("--rows", nargs="*", help="row names (default: the whole grid)")
  p.add_argument("--dir", type=pathlib.Path, default=DEFAULT_DIR, help="reports folder")
  p.add_argument("--compiled-costs", action="store_true",
                 help="also correct the compiled program's bytes and XLA's time estimate (three "
                      "reduced compiles: about 60%% more compile time per row)")
  args = p.parse_args(argv)
  rows = [parse_row(n) for n in args.rows] if args.rows else grid()
  if args.action == "list":
    for row in rows:
      print(f"{row.name}: {' '.join(row.command(args.dir / (row.name + '.json'), args.compiled_costs)[1:])}")
    return 0
  if args.action == "render":
    print(render(load(args.dir)), end="")
    return 0
  return run(rows, args.dir, args.compiled_costs)


if __name__ == "__main__":
  sys.exit(main())
