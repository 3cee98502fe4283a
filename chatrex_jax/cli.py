"""`chatrex-jax` command line: one subcommand per entry point, imported lazily.

Each subcommand lives in its own module exposing `main(argv: list[str]) -> int`, so
`chatrex-jax --help` stays fast and a missing optional dependency only affects its command.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("chatrex_jax.demo", "the embedded end-to-end run: data engine -> UPN -> ChatRex -> eval"),
    "train": ("chatrex_jax.train.main", "train with --config FILE[:ARG] --workdir DIR"),
    "predict": ("chatrex_jax.inference.predict", "image + prompt [+ boxes | UPN] -> answer, boxes, PNG"),
    "serve": ("chatrex_jax.serve", "web demo (gradio): UPN proposals and ChatRex tasks in a browser"),
    "convert": ("chatrex_jax.tools.convert", "official checkpoints <-> this project's format"),
    "check-equivalence": ("chatrex_jax.tools.check_equivalence", "compare with golden fixtures"),
    "eval": ("chatrex_jax.eval.main", "evaluate a model on a benchmark"),
    "data-engine": ("data_engine.main", "build Rexverse-style records with the Beam pipeline"),
    "aot": ("chatrex_jax.tools.aot", "compile the train step for a TPU topology: memory and FLOPs"),
}


def _usage() -> str:
  lines = ["usage: chatrex-jax COMMAND [ARGS...]", "", "commands:"]
  lines += [f"  {name:<18} {help_}" for name, (_, help_) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"chatrex-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  module = importlib.import_module(COMMANDS[name][0])
  return int(module.main(rest) or 0)


if __name__ == "__main__":
  sys.exit(main())
