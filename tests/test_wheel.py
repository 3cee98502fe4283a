"""The package as users install it: a wheel (not the editable checkout) carries its configs and
the demo's pretrained tiny LLM, and `chatrex-jax demo --quick` runs from it outside the checkout.

The wheel goes into a fresh virtual environment that reuses this environment's third-party
packages (--system-site-packages), so nothing is downloaded; the test checks that the code it
runs is the wheel's, not the checkout's.
"""
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
  root = tmp_path_factory.mktemp("wheel")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                  "-w", str(root / "dist"), str(REPO)], check=True)
  (wheel,) = (root / "dist").glob("chatrex_jax-*.whl")
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(root / "venv")], check=True)
  bin_dir = root / "venv" / "bin"
  subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                  str(wheel)], check=True)
  return wheel, bin_dir, root


def test_wheel_carries_configs_and_the_tiny_llm(venv):
  wheel, _, _ = venv
  names = set(zipfile.ZipFile(wheel).namelist())
  assert {"chatrex_jax/configs/demo.py", "chatrex_jax/configs/chatrex_7b.py",
          "chatrex_jax/demo/assets/tiny_llm/config.json",
          "chatrex_jax/demo/assets/tiny_llm/model.safetensors",
          "chatrex_jax/demo/assets/tiny_llm/tokenizer.json"} <= names
  assert not any(n.startswith(("tests/", "configs/")) for n in names)


def test_demo_quick_runs_from_the_installed_wheel(venv):
  _, bin_dir, root = venv
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  where = subprocess.run([str(bin_dir / "python"), "-c", "import chatrex_jax; print(chatrex_jax.__file__)"],
                         cwd=root, env=env, capture_output=True, text=True, check=True).stdout.strip()
  assert pathlib.Path(where).is_relative_to(root / "venv"), where
  out = subprocess.run([str(bin_dir / "chatrex-jax"), "demo", "--quick", "--no-progress",
                        "--workdir", str(root / "demo")], cwd=root, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  report = json.loads((root / "demo" / "report.json").read_text())
  assert report["mode"] == "quick" and len(report["checks"]) == 3
