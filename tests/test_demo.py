"""`chatrex-jax demo --quick`: the whole chain runs on a fresh work directory, writes a complete
report, and a rerun resumes from the saved outputs with identical metrics.

The full run (`chatrex-jax demo`, about 15 min on 2 cores) is the slow test at the end:

    pytest -m slow tests/test_demo.py
"""
import json

import numpy as np
from PIL import Image
import pytest

from chatrex_jax.demo import run as demo


@pytest.fixture(scope="module")
def quick(demo_quick):
  return demo_quick


def test_quick_run_writes_a_complete_report(quick):
  workdir, rc, report = quick
  cfg = demo.load_demo_config(True)
  assert rc == 0 and report["mode"] == "quick"
  assert [c["name"] for c in report["checks"]] == ["upn_recall", "referring_accuracy", "region_accuracy"]
  for c in report["checks"]:
    assert 0.0 <= c["value"] <= 1.0 and 0.0 <= c["baseline"] <= 1.0
    assert c["threshold"] == cfg.eval.thresholds[c["name"]]
    assert c["passed"] == (c["value"] >= c["threshold"])
  assert report["passed"] == all(c["passed"] for c in report["checks"])
  # every step ran and was timed
  assert set(report["seconds"]) == {"data", "llm", "upn", "proposals", "chatrex", "eval",
                                    "report", "total"}
  assert report["data"]["train"]["records"] == cfg.data.num_train
  assert report["data"]["heldout"]["records"] == cfg.data.num_heldout
  assert report["proposal_export"]["records"] == cfg.data.num_train
  # all four models trained for their configured steps; UPN and stage 2 losses fell
  loss = report["training_loss"]
  assert loss["upn"]["steps"] == cfg.upn.optim.total_steps
  for s in (1, 2, 3):
    assert loss[f"stage{s}"]["steps"] == cfg.chatrex[f"stage{s}"].optim.total_steps
  assert loss["upn"]["last"] < loss["upn"]["first"]
  assert loss["stage2"]["last"] < loss["stage1"]["first"]
  # held-out evaluation covered every object of every held-out scene
  upn, ref = report["metrics"]["upn"], report["metrics"]["referring"]
  assert upn["images"] == cfg.data.num_heldout and upn["gt_regions"] > cfg.data.num_heldout
  rows = [json.loads(l) for l in (workdir / "eval" / "referring_predictions.jsonl").read_text().splitlines()]
  assert len(rows) == ref["samples"] > 0
  assert abs(np.mean([r["hit"] for r in rows]) - ref["accuracy"]) < 1e-9
  assert all(r["question"].startswith("Please detect the ") for r in rows)
  assert 0.0 <= ref["random_candidate_accuracy"] <= ref["candidate_ceiling"] <= 1.0
  region = report["metrics"]["region"]
  rows = [json.loads(l) for l in (workdir / "eval" / "region_predictions.jsonl").read_text().splitlines()]
  assert len(rows) == region["samples"] > 0
  assert abs(np.mean([r["hit"] for r in rows]) - region["accuracy"]) < 1e-9
  assert all("<obj" in r["question"] and r["category"] for r in rows)
  assert report["metrics"]["upn_training_scenes"]["images"] == cfg.data.num_heldout


def test_quick_run_outputs_are_readable(quick):
  workdir, _, report = quick
  md = (workdir / "report.md").read_text()
  assert all(f"| {name} |" in md for name in ("upn_recall", "referring_accuracy", "region_accuracy"))
  assert "| check | value | baseline | threshold |" in md
  pngs = sorted((workdir / "vis").glob("heldout_*.png"))
  assert len(pngs) == demo.load_demo_config(True).eval.num_visualisations
  with Image.open(pngs[0]) as im:
    side = report["config"]["data"]["image_size"] * 4
    # both views (proposals, answers) and the legend of every expression and region question
    assert im.size[0] == 2 * side + 16 + 260 and im.size[1] >= side and im.mode == "RGB"
  for stage in (1, 2, 3):   # each stage's export is a loadable official-layout checkpoint
    assert (workdir / "chatrex" / f"stage{stage}" / "export" / "config.json").exists()
    assert (workdir / "chatrex" / f"stage{stage}" / "export" / "tokenizer.json").exists()


def test_rerun_resumes_with_identical_metrics(quick):
  workdir, _, report = quick
  assert demo.main(["--quick", "--workdir", str(workdir), "--no-progress"]) == 0
  again = json.loads((workdir / "report.json").read_text())
  assert again["metrics"] == report["metrics"]
  assert again["proposal_export"].get("reused") is True
  assert again["training_loss"] == {}    # nothing was retrained


@pytest.fixture(scope="module")
def full(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo_full")
  rc = demo.main(["--workdir", str(workdir), "--no-progress"])
  report = json.loads((workdir / "report.json").read_text())
  print(json.dumps({c["name"]: c for c in report["checks"]}, indent=1), report["seconds"])
  return rc, report


@pytest.mark.slow
def test_full_demo_upn_recall_and_time(full):
  _, report = full
  upn = {c["name"]: c for c in report["checks"]}["upn_recall"]
  assert upn["passed"] and upn["value"] > 5 * upn["baseline"]
  assert report["metrics"]["upn_training_scenes"]["recall@0.5"] >= 0.9
  assert report["seconds"]["total"] <= 15 * 60


@pytest.mark.slow
def test_full_demo_chatrex_learns_to_pick_and_name_objects(full):
  rc, report = full
  checks = {c["name"]: c for c in report["checks"]}
  for name in ("referring_accuracy", "region_accuracy"):
    assert checks[name]["passed"] and checks[name]["value"] > 2 * checks[name]["baseline"], name
  assert rc == 0 and report["passed"]
