"""`chatrex-jax train --config FILE[:ARG] --workdir DIR [--config.key=value ...]`.

The config file is an ml_collections Python file with `get_config(arg)`; `config.task`
names the model family ("chatrex" or "upn"). Multi-host runs (TPU pods, SLURM) call
`jax.distributed.initialize()` first (automatic when the environment describes several
processes, or forced with --distributed).
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import pathlib
import sys

import ml_collections


def load_config(spec: str, overrides=()) -> ml_collections.ConfigDict:
  """Loads `FILE[:ARG]` and applies `key.sub=value` overrides (values parsed as Python literals)."""
  path, _, arg = spec.partition(":")
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"config file {path} not found")
  module_spec = importlib.util.spec_from_file_location(f"_chatrex_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} has no get_config(arg) function")
  config = module.get_config(arg) if arg else module.get_config()
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} is not key=value")
    set_path(config, key, raw)
  return config


def set_path(config: ml_collections.ConfigDict, key: str, raw: str):
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    if p not in node:
      raise KeyError(f"config has no field {key!r} (no {p!r})")
    node = node[p]
  if leaf not in node:
    raise KeyError(f"config has no field {key!r}; known at that level: {sorted(node.keys())}")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw  # a bare string
  old = node[leaf]
  if isinstance(old, float) and isinstance(value, int):
    value = float(value)
  node[leaf] = value


def maybe_initialize_distributed(force: bool = False):
  import jax
  multi = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"))
  if force or (multi and int(os.environ.get("SLURM_NTASKS", "2")) > 1):
    jax.distributed.initialize()


def build_task(config):
  if config.task == "chatrex":
    from chatrex_jax.train.mllm_task import ChatRexTask
    return ChatRexTask(config)
  if config.task == "upn":
    from chatrex_jax.train.upn_task import UPNTask
    return UPNTask(config)
  raise ValueError(f"unknown config.task {config.task!r} (chatrex | upn)")


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
  argv = [a for a in argv if not a.startswith("--config.")]
  p = argparse.ArgumentParser(prog="chatrex-jax train", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="FILE[:ARG], e.g. configs/chatrex_tiny.py:stage1")
  p.add_argument("--workdir", required=True)
  p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize()")
  p.add_argument("--max-steps-this-run", type=int, default=None,
                 help="stop after this many steps (resumable), e.g. for preemptible slots")
  args = p.parse_args(argv)
  maybe_initialize_distributed(args.distributed)
  config = load_config(args.config, overrides)
  from chatrex_jax.train.trainer import Trainer
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  trainer = Trainer(config, build_task(config), workdir)
  result = trainer.train(max_steps_this_run=args.max_steps_this_run)
  last = result.history[-1] if result.history else {}
  print(f"stopped at step {result.step} ({result.stopped_by}); last loss {last.get('loss', float('nan')):.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
