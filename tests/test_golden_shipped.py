"""The golden fixtures shipped in tests/golden: complete, loadable, and equal to their source.

* Always: every fixture folder has a parsable meta.json whose component has a registered runner,
  inputs.npz / outputs.npz whose arrays match meta.json `array_shapes`, and the weights file
  meta.json names; the README describes every folder; the golden root defaults to tests/golden.
* When the generator's output `../shared/golden` exists beside the checkout: the same folders,
  meta.json and weights.safetensors byte-identical, every npz array identical (keys, dtypes,
  shapes, bytes). Arrays, not npz files, because upn_tiny's npz files were recompressed.
"""
import json
import pathlib
import shutil

import numpy as np
import pytest

from chatrex_jax import testing
from chatrex_jax.convert import safetensors_io
from chatrex_jax.tools import check_equivalence
from chatrex_jax.tools.equivalence import registry

SHIPPED = pathlib.Path(__file__).resolve().parent / "golden"
SOURCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "golden"
# Named here so that losing a folder fails a test instead of shrinking the checks.
FIXTURES = ("chatrex_forward", "clip_vision", "convnext_aux", "msdeform_attn", "multi_level_roi",
            "processor_rexseek", "qwen2_lm", "roi_align_nonsquare_s1", "roi_align_square_s0.25",
            "upn_filter", "upn_tiny", "upn_wrapper_e2e")


def _names(root: pathlib.Path) -> list[str]:
  return [p.name for p in testing.golden_fixtures(root)]


def _arrays(path: pathlib.Path) -> dict[str, np.ndarray]:
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------- always
def test_every_fixture_is_shipped():
  assert _names(SHIPPED) == sorted(FIXTURES)


@pytest.mark.parametrize("name", FIXTURES)
def test_shipped_fixture_is_complete_and_loadable(name):
  path = SHIPPED / name
  meta = json.loads((path / "meta.json").read_text())
  assert meta["component"] in registry.runners(), f"{name}: no runner for {meta['component']!r}"
  for part in ("inputs", "outputs"):
    arrays = _arrays(path / f"{part}.npz")
    shapes = {k: list(v.shape) for k, v in arrays.items()}
    assert shapes == meta["array_shapes"][part], f"{name}/{part}.npz differs from meta.json"
  files = {"meta.json", "inputs.npz", "outputs.npz"}
  if "weights" in meta:
    weights = safetensors_io.load_file(path / meta["weights"]["file"])
    assert len(weights) == meta["weights"]["num_tensors"]
    files.add(meta["weights"]["file"])
  assert {p.name for p in path.iterdir()} == files, f"{name}: unexpected or missing files"


def test_readme_describes_every_fixture():
  text = (SHIPPED / "README.md").read_text()
  missing = [n for n in FIXTURES if f"`{n}`" not in text]
  assert not missing, f"tests/golden/README.md does not mention {missing}"


def test_golden_root_defaults_to_shipped_fixtures(monkeypatch, tmp_path):
  monkeypatch.delenv("CHATREX_GOLDEN", raising=False)
  assert testing.golden_root() == SHIPPED
  monkeypatch.setenv("CHATREX_GOLDEN", str(tmp_path))
  assert testing.golden_root() == tmp_path
  monkeypatch.setenv("CHATREX_GOLDEN", str(tmp_path / "absent"))
  assert testing.golden_root() is None
  with pytest.raises(FileNotFoundError, match="CHATREX_GOLDEN"):
    testing.require_golden_root()


def test_check_equivalence_without_arguments_runs_every_fixture(monkeypatch, tmp_path, capsys):
  # Two cheap fixtures stand in for the full set (all 12 take minutes); the root comes from
  # CHATREX_GOLDEN, which is also how the default is overridden.
  for name in ("upn_filter", "roi_align_nonsquare_s1"):
    shutil.copytree(SHIPPED / name, tmp_path / name)
  (tmp_path / "README.md").write_text("not a fixture\n")
  monkeypatch.setenv("CHATREX_GOLDEN", str(tmp_path))
  assert check_equivalence.main([]) == 0
  out = capsys.readouterr().out
  assert "PASS roi_align_nonsquare_s1" in out and "PASS upn_filter" in out


def test_check_equivalence_without_fixtures_says_what_to_set(monkeypatch, tmp_path, capsys):
  monkeypatch.setenv("CHATREX_GOLDEN", str(tmp_path / "absent"))
  assert check_equivalence.main([]) == 2
  assert "CHATREX_GOLDEN" in capsys.readouterr().err


# ----------------------------------------------------------------------------- drift
def test_shipped_fixtures_equal_their_source():
  if not SOURCE.is_dir():
    pytest.skip(f"{SOURCE} does not exist: nothing to compare the shipped fixtures against")
  assert _names(SHIPPED) == _names(SOURCE)
  problems = []
  for name in _names(SOURCE):
    src, dst = SOURCE / name, SHIPPED / name
    src_files = sorted(p.name for p in src.iterdir())
    if src_files != sorted(p.name for p in dst.iterdir()):
      problems.append(f"{name}: files differ")
      continue
    for f in src_files:
      if f.endswith(".npz"):
        a, b = _arrays(src / f), _arrays(dst / f)
        if list(a) != list(b):
          problems.append(f"{name}/{f}: keys differ")
        for k in a:
          if k in b and (a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
                         or a[k].tobytes() != b[k].tobytes()):
            problems.append(f"{name}/{f}[{k}] differs")
      elif (src / f).read_bytes() != (dst / f).read_bytes():
        problems.append(f"{name}/{f}: bytes differ")
  assert not problems, "\n".join(problems)
