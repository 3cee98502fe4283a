"""The package as users install it: a wheel (not the editable checkout) carries its configs and
the demo's pretrained tiny LLM, which the
installed code loads outside the checkout; `chatrex-jax demo --quick` runs from it (slow).

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


def _outside_checkout() -> dict:
  return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_installed_wheel_loads_its_own_pretrained_llm(venv):
  """What the demo's first step does (`load_pretrained_llm` on the default config), from the
  wheel's code and package data: seconds, where the whole quick demo below takes minutes."""
  _, bin_dir, root = venv
  probe = ("import chatrex_jax, json\n"
           "from chatrex_jax.demo.run import load_demo_config, load_pretrained_llm\n"
           "config, params, tokenizer = load_pretrained_llm(load_demo_config(quick=True).llm)\n"
           "print(json.dumps({'file': chatrex_jax.__file__, 'vocab': config.vocab_size,\n"
           "                  'obj7': tokenizer.convert_tokens_to_ids('<obj7>')}))\n")
  out = subprocess.run([str(bin_dir / "python"), "-c", probe], cwd=root, env=_outside_checkout(),
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  loaded = json.loads(out.stdout.strip().splitlines()[-1])
  assert pathlib.Path(loaded["file"]).is_relative_to(root / "venv"), loaded["file"]
  assert 0 <= loaded["obj7"] < loaded["vocab"]


@pytest.mark.slow  # ~7 minutes on 2 cores; tests/test_demo.py runs the same quick demo from the checkout
def test_demo_quick_runs_from_the_installed_wheel(venv):
  _, bin_dir, root = venv
  env = _outside_checkout()
  where = subprocess.run([str(bin_dir / "python"), "-c", "import chatrex_jax; print(chatrex_jax.__file__)"],
                         cwd=root, env=env, capture_output=True, text=True, check=True).stdout.strip()
  assert pathlib.Path(where).is_relative_to(root / "venv"), where
  out = subprocess.run([str(bin_dir / "chatrex-jax"), "demo", "--quick", "--no-progress",
                        "--workdir", str(root / "demo")], cwd=root, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  report = json.loads((root / "demo" / "report.json").read_text())
  assert report["mode"] == "quick" and len(report["checks"]) == 3
