"""Test harness shared by every test.

JAX must see 8 CPU devices for the sharding tests, so XLA_FLAGS is set here, before
anything imports jax. Equivalence tests opt into fp32 `highest` matmul precision through
the `highest_precision` fixture (or `chatrex_jax.testing.highest_precision`).
"""
import os
import pathlib

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402

from chatrex_jax import testing  # noqa: E402


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
  """The golden fixtures made by the official PyTorch code: tests/golden, or $CHATREX_GOLDEN."""
  try:
    return testing.require_golden_root()
  except FileNotFoundError as e:
    pytest.fail(str(e))


@pytest.fixture
def highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="session")
def n_devices() -> int:
  return jax.device_count()


@pytest.fixture(scope="session")
def demo_quick(tmp_path_factory):
  """One `chatrex-jax demo --quick` run (about 4 minutes) shared by the demo and the serve tests:
  (workdir, exit status, report.json)."""
  import json

  from chatrex_jax.demo import run as demo
  workdir = tmp_path_factory.mktemp("demo")
  rc = demo.main(["--quick", "--workdir", str(workdir), "--no-progress"])
  return workdir, rc, json.loads((workdir / "report.json").read_text())
