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
# XLA's persistent compilation cache, shared by both workers and by the training and demo
# subprocesses the tests start: a run restarted after a kill, or the same tiny step compiled by
# several tests, reuses the executable instead of compiling it again. One folder per test run.
_OWN_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:   # the controller's choice reaches its workers
  import tempfile
  _OWN_XLA_CACHE = tempfile.mkdtemp(prefix="chatrex-jax-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_XLA_CACHE

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402

from chatrex_jax import testing  # noqa: E402

# The suite runs on two pytest-xdist workers (pyproject's addopts: `-n 2 --dist loadgroup`):
# XLA's compiles, a large part of the suite's time, use one core each. A group runs whole on one
# worker, so module-scoped fixtures are built once; the modules sharing the session's quick demo
# run (`demo_quick`) form one group, so it is built once too.
_SHARE_DEMO_QUICK = ("tests.test_demo", "tests.test_serve")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    module = item.module.__name__ if item.module is not None else item.nodeid.split("::")[0]
    group = "demo_quick" if module in _SHARE_DEMO_QUICK else module
    item.add_marker(pytest.mark.xdist_group(group))


def pytest_unconfigure(config):
  if _OWN_XLA_CACHE is not None and not hasattr(config, "workerinput"):
    import shutil
    shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)


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
