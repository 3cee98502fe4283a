"""Fixture loading, the runner registry and the comparison rules of `check_equivalence`."""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import pathlib
import pkgutil
from typing import Callable

import numpy as np


@dataclasses.dataclass
class Fixture:
  """One golden folder: meta.json, inputs.npz, outputs.npz and optional weights.safetensors."""
  path: pathlib.Path

  @property
  def name(self) -> str:
    return self.path.name

  @functools.cached_property
  def meta(self) -> dict:
    return json.loads((self.path / "meta.json").read_text())

  @property
  def component(self) -> str:
    return self.meta["component"]

  @property
  def config(self) -> dict:
    return self.meta.get("config", {})

  @functools.cached_property
  def inputs(self) -> dict[str, np.ndarray]:
    with np.load(self.path / "inputs.npz") as z:
      return {k: z[k] for k in z.files}

  @functools.cached_property
  def outputs(self) -> dict[str, np.ndarray]:
    with np.load(self.path / "outputs.npz") as z:
      return {k: z[k] for k in z.files}

  def weights(self) -> dict[str, np.ndarray]:
    """The fixture's torch state dict, read through the project's safetensors reader."""
    from chatrex_jax.convert import safetensors_io
    return safetensors_io.load_file(self.path / "weights.safetensors")

  @property
  def atol(self) -> float:
    return float(self.meta.get("atol", 1e-5))

  @property
  def rtol(self) -> float:
    return float(self.meta.get("rtol", 1e-5))


@dataclasses.dataclass
class RunResult:
  """What a runner produced.

  outputs: arrays to compare with outputs.npz under the same names (integer arrays and names
    in `exact` must match exactly; floats use the fixture's atol/rtol).
  not_compared: reference outputs deliberately not produced, each with the reason (printed).
    Any other reference output that is missing is a failure.
  notes: extra lines to print (e.g. a known official bug that was reported, not copied).
  """
  outputs: dict[str, np.ndarray]
  exact: frozenset[str] = frozenset()
  not_compared: dict[str, str] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)


Runner = Callable[[Fixture], RunResult]
_REGISTRY: dict[str, Runner] = {}


def register(component: str):
  def deco(fn: Runner) -> Runner:
    if component in _REGISTRY and _REGISTRY[component] is not fn:
      raise ValueError(f"component {component!r} registered twice")
    _REGISTRY[component] = fn
    return fn
  return deco


def runners() -> dict[str, Runner]:
  """Imports every runner module of this package and returns the registry."""
  import chatrex_jax.tools.equivalence as pkg
  for info in pkgutil.iter_modules(pkg.__path__):
    if info.name != "registry":
      importlib.import_module(f"{pkg.__name__}.{info.name}")
  return dict(_REGISTRY)


@dataclasses.dataclass
class Line:
  output: str
  max_abs: float
  max_rel: float
  ok: bool
  why: str = ""


def compare(fixture: Fixture, result: RunResult) -> tuple[list[Line], list[str]]:
  """Compares a run with the reference; returns per-output lines and failure reasons."""
  lines, failures = [], []
  atol, rtol = fixture.atol, fixture.rtol
  for name, want in fixture.outputs.items():
    if name not in result.outputs:
      if name not in result.not_compared:
        failures.append(f"output {name!r} not produced")
      continue
    got = np.asarray(result.outputs[name])
    want = np.asarray(want)
    if got.shape != want.shape:
      failures.append(f"{name}: shape {got.shape} != reference {want.shape}")
      lines.append(Line(name, float("nan"), float("nan"), False, "shape"))
      continue
    if want.size == 0:
      lines.append(Line(name, 0.0, 0.0, True))
      continue
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    max_abs = float(diff.max())
    max_rel = float((diff / np.maximum(np.abs(want.astype(np.float64)), 1e-12)).max())
    if np.issubdtype(want.dtype, np.integer) or name in result.exact:
      ok = bool(np.array_equal(got, want))
    else:
      ok = bool(np.allclose(got, want, atol=atol, rtol=rtol))
    lines.append(Line(name, max_abs, max_rel, ok))
    if not ok:
      failures.append(f"{name}: max_abs={max_abs:.3g} exceeds atol={atol:g}/rtol={rtol:g}"
                      if not (np.issubdtype(want.dtype, np.integer) or name in result.exact)
                      else f"{name}: values differ (exact comparison)")
  for name in result.outputs:
    if name not in fixture.outputs:
      failures.append(f"runner produced {name!r}, which the fixture does not have")
  return lines, failures
