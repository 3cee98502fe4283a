"""The project's configs (`ml_collections` files with `get_config(arg)`) and their one loader.

  load_config("demo:quick")                         # a packaged config by name, with its arg
  load_config("chatrex_tiny.py:stage2", ["optim.lr=1e-4", "data.sources=[{'path': '/d'}]"])
  load_config("/home/me/my_config.py:arg")          # any config file by path

Every command (`chatrex-jax train`, `data-engine`, `demo`, `predict-upn`, the AOT tool) loads
through `load_config` and takes overrides as `--config.KEY=VALUE` (`apply_overrides`).

Names resolve to the modules of this package, so the configs travel with an installed wheel;
`configs/NAME.py` (the repository's old location) and `chatrex_jax/configs/NAME.py` are
accepted as names too. A path that exists on disk is loaded as a file.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib
import pkgutil
from typing import Any, Iterable

import ml_collections

from chatrex_jax.errors import UserError

_PACKAGE = __name__
_HERE = pathlib.Path(__file__).parent


class ConfigError(UserError, ValueError):
  """A config that cannot be loaded, or an override that does not fit it."""


class ConfigKeyError(UserError, KeyError):
  """An override names a field the config does not have."""

  def __str__(self) -> str:     # not KeyError's quoted repr
    return str(self.args[0]) if self.args else ""


def names() -> list[str]:
  """The packaged configs (module names with a `get_config`)."""
  return sorted(m.name for m in pkgutil.iter_modules([str(_HERE)]) if m.name != "common")


def _module(name: str):
  path = pathlib.Path(name)
  if path.is_file():
    spec = importlib.util.spec_from_file_location(f"_chatrex_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  stem = path.name.removesuffix(".py")
  if (len(path.parts) > 1 and path.parent.name != "configs") or stem not in names():
    raise FileNotFoundError(f"config {name!r} is neither a file nor a packaged config (packaged: "
                            f"{', '.join(names())})")
  return importlib.import_module(f"{_PACKAGE}.{stem}")


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """`NAME[:ARG]` -> `get_config(ARG)` (no ARG: `get_config()`), then the `KEY=VALUE` overrides."""
  name, _, arg = str(spec).partition(":")
  module = _module(name)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config {name!r} has no get_config(arg) function")
  config = module.get_config(arg) if arg else module.get_config()
  apply_overrides(config, overrides)
  return config


def parse_value(raw: str, old: Any = None) -> Any:
  """An override's text -> value: a Python literal (`3`, `1e-4`, `[1, 2]`, `{'a': 1}`, `None`),
  else the bare string. Against the field's current value: `true`/`false` (any case) for a bool
  field, an int widened to float for a float field."""
  if isinstance(old, bool) and raw.strip().lower() in ("true", "false"):
    return raw.strip().lower() == "true"
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def set_path(config, key: str, raw: str) -> None:
  """Sets the existing field `a.b.c` to `parse_value(raw)` (a misspelt key is an error that
  lists the fields at that level)."""
  *parents, leaf = key.split(".")
  node = config
  for i, p in enumerate(parents):
    if p not in node:
      raise ConfigKeyError(f"config has no field {key!r} (no {'.'.join(parents[:i + 1])!r})")
    node = node[p]
  if isinstance(node, ml_collections.ConfigDict) and leaf not in node:
    raise ConfigKeyError(f"config has no field {key!r}; known at that level: {sorted(node.keys())}")
  old = node.get(leaf) if isinstance(node, dict) else node[leaf]
  try:
    node[leaf] = parse_value(raw, old)
  except TypeError as e:   # ml_collections keeps a field's type
    raise ConfigError(f"--config.{key}={raw}: the field is of type {type(old).__name__} "
                      f"(now {old!r}); give a value of that type ({e})") from e


def apply_overrides(config, overrides: Iterable[str]) -> None:
  """`KEY=VALUE` items (a leading `--config.` is accepted) applied in order."""
  for item in overrides:
    key, sep, raw = item.removeprefix("--config.").partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. --config.optim.lr=1e-4)")
    set_path(config, key, raw)


def merge_config(config, partial, *, skip: Iterable[str] = (), _prefix: str = "") -> None:
  """Sets `config`'s fields from the nested mapping `partial` (the same keys, any depth), with
  the strictness of `--config.` overrides: a key the config lacks is an error. Top-level keys in
  `skip` are left out (e.g. the `base` a demo section names)."""
  for key, value in partial.items():
    if key in skip:
      continue
    path = f"{_prefix}{key}"
    if key not in config:
      raise ConfigKeyError(f"config has no field {path!r}; known at that level: {sorted(config.keys())}")
    if isinstance(value, (dict, ml_collections.ConfigDict)) and isinstance(config[key], ml_collections.ConfigDict):
      merge_config(config[key], value, _prefix=path + ".")
    else:
      try:
        config[key] = value
      except TypeError as e:
        raise ConfigError(f"{path}: the field is of type {type(config[key]).__name__} "
                          f"(now {config[key]!r}), got {value!r}") from e


def split_overrides(argv: Iterable[str]) -> tuple[list[str], list[str]]:
  """(other arguments, `KEY=VALUE` overrides) of a command line whose overrides are given as
  `--config.KEY=VALUE`."""
  argv = list(argv)
  overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
  return [a for a in argv if not a.startswith("--config.")], overrides
