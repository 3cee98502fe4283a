"""User mistakes, reported as one line and exit status 2; and writes that are never half done.

Every `chatrex-jax` command's `main(argv)` is wrapped by `command("NAME")`: an error in what the
user gave (a path, a file's contents, an option, a config key or value, a checkpoint of the
wrong kind) prints `chatrex-jax NAME: error: MESSAGE` on stderr and returns 2, with no
traceback. The message says what was wrong, with which file or field, and what to do. A
programming error still raises (exit status 1, traceback).

`UserError` is the type to raise. The library's older input errors (`ImageInputError`,
`ConversionError`, `GGUFError`, the data layer's schema and field errors) derive from it as well
as from `ValueError`, so callers that catch `ValueError` keep working. The OS errors that name a
path the user gave (missing, a folder where a file belongs, no permission) are reported the
same way.

`atomic_path(final)` gives a temporary sibling to write and renames it over `final` only when
the block succeeds, so a failed or killed command leaves the old file (or none), never a torn one.
"""
from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import sys
from typing import Callable, Iterator


class UserError(Exception):
  """A mistake in the user's input: reported in one line by the CLI, exit status 2."""


# OS errors about a path the user named: the message carries the path.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)


def user_message(error: BaseException) -> str | None:
  """The one-line report of a user mistake, or None for a programming error."""
  if isinstance(error, UserError):
    return str(error)
  if isinstance(error, _PATH_ERRORS):   # raised by the OS (filename set) or with our message
    return f"{error.filename}: {error.strerror}" if error.filename is not None else str(error)
  return None


def command(name: str) -> Callable:
  """Decorator for a command's `main(argv) -> int`: user mistakes -> one stderr line, exit 2."""

  def wrap(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def run(argv=None) -> int:
      try:
        return int(main(argv) or 0)
      except SystemExit as e:   # argparse's usage errors (2, message printed) and --help (0)
        return e.code if isinstance(e.code, int) else 2
      except Exception as e:   # noqa: BLE001 - sorted into user mistakes and bugs just below
        message = user_message(e)
        if message is None:
          raise
        print(f"chatrex-jax {name}: error: {message}", file=sys.stderr)
        return 2
    return run
  return wrap


@contextlib.contextmanager
def atomic_path(final) -> Iterator[pathlib.Path]:
  """Yields `FINAL.partial` (same folder, same suffix last so writers that infer the format from
  the name keep working) and renames it to `final` when the block completes; on an error the
  temporary is removed and `final` is left as it was. For an object-store `final` (gs://...)
  the temporary is a local file uploaded as one object when the block completes (an object
  store replaces whole objects atomically and has no rename)."""
  from chatrex_jax import storage
  if storage.is_remote(final):
    import tempfile
    remote = storage.path(final)
    with tempfile.TemporaryDirectory() as d:
      tmp = pathlib.Path(d) / f"{remote.stem}.partial{remote.suffix}"
      yield tmp
      remote.write_bytes(tmp.read_bytes())
    return
  final = pathlib.Path(final)
  tmp = final.with_name(f"{final.stem}.partial{final.suffix}")
  try:
    yield tmp
    os.replace(tmp, final)
  finally:
    if tmp.exists():
      tmp.unlink()
