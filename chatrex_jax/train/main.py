"""`chatrex-jax train --config FILE[:ARG] --workdir DIR [--config.key=value ...]`.

The config file is an ml_collections Python file with `get_config(arg)`; `config.task`
names the model family ("chatrex" or "upn"). Multi-host runs (TPU pods, SLURM) call
`jax.distributed.initialize()` first (automatic when the environment describes several
processes, or forced with --distributed).
"""
from __future__ import annotations

import argparse
import os
import sys

from chatrex_jax.configs import ConfigError, load_config, split_overrides
from chatrex_jax.errors import command


def maybe_initialize_distributed(force: bool = False, coordinator: str | None = None,
                                 num_processes: int | None = None, process_id: int | None = None,
                                 heartbeat_timeout: int = 100) -> None:
  """`jax.distributed.initialize()` for multi-process runs.

  Pods and clusters (TPU, SLURM, Open MPI) describe themselves: nothing to pass. Elsewhere (CPU
  hosts, a test on one machine) give coordinator, num_processes and process_id; a process whose
  peer stops sending heartbeats for `heartbeat_timeout` seconds fails with an error rather than
  waiting in a collective forever.
  """
  import jax
  explicit = (coordinator, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ConfigError("--coordinator, --num-processes and --process-id go together: give all "
                        "three (or none, on a TPU pod / SLURM / Open MPI, which describe themselves)")
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"--process-id {process_id} outside [0, --num-processes {num_processes})")
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout)
    return
  multi = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"))
  if force or (multi and int(os.environ.get("SLURM_NTASKS", "2")) > 1):
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout)


def build_task(config):
  if config.task == "chatrex":
    from chatrex_jax.train.mllm_task import ChatRexTask
    return ChatRexTask(config)
  if config.task == "upn":
    from chatrex_jax.train.upn_task import UPNTask
    return UPNTask(config)
  raise ConfigError(f"unknown config.task {config.task!r} (chatrex | upn)")


@command("train")
def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  argv, overrides = split_overrides(argv)
  p = argparse.ArgumentParser(prog="chatrex-jax train", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True,
                 help="NAME[:ARG] (a packaged config, e.g. chatrex_tiny:stage1) or FILE[:ARG]")
  p.add_argument("--workdir", required=True)
  p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize()")
  p.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator (multi-process runs "
                 "outside a pod or cluster, with --num-processes and --process-id)")
  p.add_argument("--num-processes", type=int)
  p.add_argument("--process-id", type=int)
  p.add_argument("--heartbeat-timeout", type=int, default=100,
                 help="seconds without a peer's heartbeat before a process fails (default 100)")
  p.add_argument("--max-steps-this-run", type=int, default=None,
                 help="stop after this many steps (resumable), e.g. for preemptible slots")
  args = p.parse_args(argv)
  maybe_initialize_distributed(args.distributed, args.coordinator, args.num_processes,
                               args.process_id, args.heartbeat_timeout)
  config = load_config(args.config, overrides)
  from chatrex_jax.train.trainer import Trainer
  workdir = args.workdir   # a local folder or gs://bucket/run
  trainer = Trainer(config, build_task(config), workdir)   # writes workdir/config.json
  result = trainer.train(max_steps_this_run=args.max_steps_this_run)
  last = result.history[-1] if result.history else {}
  print(f"stopped at step {result.step} ({result.stopped_by}); last loss {last.get('loss', float('nan')):.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
