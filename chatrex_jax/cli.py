"""`chatrex-jax` command line: one subcommand per entry point, imported lazily.

Each subcommand lives in its own module exposing `main(argv: list[str]) -> int`, so
`chatrex-jax --help` stays fast and a missing optional dependency only affects its command.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

# name -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("chatrex_jax.demo", "the embedded end-to-end run: data engine -> UPN -> ChatRex -> eval"),
    "train": ("chatrex_jax.train.main", "train with --config FILE[:ARG] --workdir DIR"),
    "predict": ("chatrex_jax.inference.predict", "image + prompt [+ boxes | UPN] -> answer, boxes, PNG"),
    "convert": ("chatrex_jax.tools.convert", "official checkpoints <-> this project's format"),
    "check-equivalence": ("chatrex_jax.tools.check_equivalence", "compare with golden fixtures"),
    "eval": ("chatrex_jax.eval.main", "evaluate a model on a benchmark"),
    "data-engine": ("data_engine.main", "build Rexverse-style records with the Beam pipeline"),
}


def available() -> dict[str, bool]:
  """Which subcommands are built in this checkout."""
  return {name: _exists(module) for name, (module, _) in COMMANDS.items()}


def _exists(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # a parent package is missing
    return False


def _usage() -> str:
  built = available()
  lines = ["usage: chatrex-jax COMMAND [ARGS...]", "", "commands:"]
  for name, (_, help_) in COMMANDS.items():
    lines.append(f"  {name:<18} {help_}{'' if built[name] else '  [not built yet]'}")
  return "\n".join(lines)


def _not_built(name: str) -> int:
  if name == "demo":
    built = [n for n, ok in available().items() if ok and n != "demo"]
    print("chatrex-jax demo: the end-to-end demo is not built yet in this checkout.\n"
          f"Built commands: {', '.join(built) or 'none'}.\n"
          "Run `chatrex-jax check-equivalence` (every fixture in tests/golden) to check the "
          "components that exist.")
    return 0
  print(f"chatrex-jax {name}: not built yet in this checkout.", file=sys.stderr)
  return 2


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"chatrex-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  module_name = COMMANDS[name][0]
  if not _exists(module_name):
    return _not_built(name)
  module = importlib.import_module(module_name)
  return int(module.main(rest) or 0)


if __name__ == "__main__":
  sys.exit(main())
