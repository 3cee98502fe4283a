"""Checks this project's components against golden fixtures made by the official PyTorch code.

  python -m chatrex_jax.tools.check_equivalence              # every fixture in tests/golden
  python -m chatrex_jax.tools.check_equivalence tests/golden/qwen2_lm [DIR ...]

With no DIR, every fixture folder of the golden root is checked: the checkout's tests/golden, or
$CHATREX_GOLDEN when set (a wheel install has no tests/; set it there).

For each fixture: rebuild the component from meta.json, load weights.safetensors through the
project's converter, run on inputs.npz, compare with outputs.npz using the fixture's
atol/rtol, print `<fixture>/<output>: max_abs=.. max_rel=..` per output and `PASS <fixture>`
or `FAIL <fixture>: <reason>`. Exit status 0 iff every fixture passes.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import traceback

from chatrex_jax.errors import UserError, command


def check(path: pathlib.Path, out=None) -> bool:
  out = out or sys.stdout
  from chatrex_jax.tools.equivalence import registry
  fixture = registry.Fixture(pathlib.Path(path))
  name = fixture.name
  try:
    component = fixture.component
  except (FileNotFoundError, NotADirectoryError):
    print(f"FAIL {name}: no meta.json in {path}", file=out)
    return False
  runner = registry.runners().get(component)
  if runner is None:
    print(f"FAIL {name}: unknown component {component!r}", file=out)
    return False
  try:
    import jax
    with jax.default_matmul_precision("highest"):
      result = runner(fixture)
    lines, failures = registry.compare(fixture, result)
  except Exception as e:  # a crash is a failure of this fixture, not of the tool
    traceback.print_exc(file=sys.stderr)
    print(f"FAIL {name}: {type(e).__name__}: {e}", file=out)
    return False
  for line in lines:
    flag = "" if line.ok else "  <-- exceeds tolerance"
    print(f"{name}/{line.output}: max_abs={line.max_abs:.3g} max_rel={line.max_rel:.3g}{flag}",
          file=out)
  for output, why in result.not_compared.items():
    print(f"{name}/{output}: not compared ({why})", file=out)
  for note in result.notes:
    print(f"{name}: note: {note}", file=out)
  if failures:
    print(f"FAIL {name}: " + "; ".join(failures), file=out)
    return False
  print(f"PASS {name}", file=out)
  return True


@command("check-equivalence")
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="check_equivalence", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("fixtures", nargs="*", type=pathlib.Path,
                      help="golden fixture folders (default: every one in tests/golden or "
                           "$CHATREX_GOLDEN)")
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  fixtures = args.fixtures
  if not fixtures:
    from chatrex_jax import testing
    try:
      root = testing.require_golden_root()
    except FileNotFoundError as e:
      print(f"check_equivalence: {e}", file=sys.stderr)
      return 2
    fixtures = testing.golden_fixtures(root)
    if not fixtures:
      print(f"check_equivalence: no fixture folders in {root}", file=sys.stderr)
      return 2
  for path in fixtures:
    if not path.exists():
      raise UserError(f"{path}: no such fixture folder; give golden fixture folders (each with a "
                      "meta.json), or none for every one in tests/golden")
    if path.is_dir() and not (path / "meta.json").is_file():
      raise UserError(f"{path}: not a golden fixture folder (no meta.json); fixtures are the "
                      "folders of tests/golden")
  ok = True
  for path in fixtures:
    if path.is_file():  # e.g. the README that `golden/*` also matches: not a fixture
      print(f"{path}: a file, not a fixture folder; ignored")
      continue
    ok &= check(path)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
