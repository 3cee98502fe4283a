"""The demo's outputs: report.json (everything measured), report.md (the summary a person reads)
and vis/*.png (held-out scenes: UPN proposals | ChatRex referring answers)."""
from __future__ import annotations

import json
import pathlib
import platform
from typing import Sequence

import numpy as np
from PIL import Image

from chatrex_jax.inference.visualize import draw_boxes
from chatrex_jax.protocol import tokens as C

# Box colours chosen to stay visible on every shape colour of the scenes (red, green, blue,
# yellow, pink) and on the light background.
COARSE, FINE, HIT, MISS, GT = (0, 0, 0), (0, 190, 255), (0, 200, 0), (255, 0, 255), (110, 110, 110)

CHECKS = (  # (threshold key, (metrics section, value key), (section, baseline key))
    ("upn_recall", ("upn", "recall@0.5"), ("upn", "recall@0.5_random_boxes")),
    ("referring_accuracy", ("referring", "accuracy"), ("referring", "random_candidate_accuracy")),
    ("region_accuracy", ("region", "accuracy"), ("region", "majority_category_accuracy")),
)


def _environment() -> dict:
  import jax
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "python": platform.python_version(),
          "machine": platform.machine(), "cpu_count": __import__("os").cpu_count()}


def build_report(cfg, metrics: dict, *, data_counts: dict, export_stats: dict,
                 histories: dict) -> dict:
  """Everything measured; the caller adds "seconds" (per demo step and "total")."""
  checks = []
  for name, (sec, key), (bsec, bkey) in CHECKS:
    value, baseline = metrics[sec][key], metrics[bsec][bkey]
    threshold = float(cfg.eval.thresholds[name])
    checks.append({"name": name, "value": value, "baseline": baseline, "threshold": threshold,
                   "passed": bool(value >= threshold)})
  losses = {name: {"first": h[0]["loss"], "last": h[-1]["loss"], "steps": h[-1]["step"]}
            for name, h in histories.items() if h}
  return {
      "mode": cfg.mode, "passed": all(c["passed"] for c in checks), "checks": checks,
      "metrics": metrics,
      "data": data_counts, "proposal_export": export_stats, "training_loss": losses,
      "config": cfg.to_dict(), "environment": _environment(),
  }


def write_json(root: pathlib.Path, report: dict) -> None:
  tmp = root / "report.json.tmp"
  tmp.write_text(json.dumps(report, indent=2, default=float))
  tmp.replace(root / "report.json")


def _fmt(v) -> str:
  return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
  m = report["metrics"]
  lines = [f"# chatrex-jax demo ({report['mode']})", "",
           "Synthetic scenes through the data engine, a tiny UPN trained from random "
           "initialisation and a ChatRex on a pretrained LLM (random-initialised vision towers), "
           "trained on this machine and evaluated on held-out scenes.", "",
           "| check | value | baseline | threshold | |", "|---|---|---|---|---|"]
  for c in report["checks"]:
    lines.append(f"| {c['name']} | {c['value']:.3f} | {c['baseline']:.3f} | {c['threshold']:.2f} | "
                 f"{'pass' if c['passed'] else 'MISS'} |")
  held, seen = m["upn"], m["upn_training_scenes"]
  lines += ["", "## UPN (recall at IoU 0.5)", "", "| measure | held-out scenes | training scenes |",
            "|---|---|---|"]
  lines += [f"| {k} | {_fmt(v)} | {_fmt(seen[k])} |" for k, v in held.items() if not isinstance(v, dict)]
  lines += [f"| proposals per image ({k}) | {v:.1f} | {seen['proposals_per_image'][k]:.1f} |"
            for k, v in held["proposals_per_image"].items()]
  lines += ["", "## ChatRex referring (held-out, UPN candidates, top-1 IoU >= 0.5)", "",
            "| measure | value |", "|---|---|"]
  lines += [f"| {k} | {_fmt(v)} |" for k, v in m["referring"].items()]
  lines += ["", "## ChatRex region understanding (held-out, category of a given <objK>)", "",
            "| measure | value |", "|---|---|"]
  lines += [f"| {k} | {_fmt(v)} |" for k, v in m["region"].items() if not isinstance(v, dict)]
  lines += [f"| accuracy ({k}) | {_fmt(v)} |" for k, v in m["region"]["per_category"].items()]
  lines += ["", "## Training loss", "", "| model | steps | first | last |", "|---|---|---|---|"]
  lines += [f"| {k} | {v['steps']} | {v['first']:.3f} | {v['last']:.3f} |"
            for k, v in report["training_loss"].items()]
  lines += ["", "## Time (seconds)", "", "| step | s |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in report["seconds"].items()]
  env = report["environment"]
  lines += ["", f"jax {env['jax']} on {env['backend']} ({env['cpu_count']} CPUs). "
            "Visualisations: vis/*.png (left: UPN proposals, coarse black / fine cyan; middle: "
            "the box each referring expression chose, numbered as in the legend, green = hit, "
            "magenta = miss, ground truth dashed grey; right: the legend, with the region "
            "questions' answers).", ""]
  return "\n".join(lines)


def summary_lines(report: dict) -> str:
  out = [f"demo ({report['mode']}): {'all checks passed' if report['passed'] else 'some checks missed'}"
         f" in {report['seconds']['total']:.0f}s"]
  for c in report["checks"]:
    out.append(f"  {c['name']:<20} {c['value']:.3f}  (baseline {c['baseline']:.3f}, "
               f"threshold {c['threshold']:.2f}: {'pass' if c['passed'] else 'MISS'})")
  return "\n".join(out)


def _dashed(draw, box, color, dash: int = 3):
  x0, y0, x1, y1 = [float(v) for v in box]
  for (a, b) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
    n = max(1, int(np.hypot(b[0] - a[0], b[1] - a[1]) // (2 * dash)))
    for i in range(n):
      t0, t1 = (2 * i) / (2 * n), (2 * i + 1) / (2 * n)
      draw.line([a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0,
                 a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1], fill=color)


def visualise(scene, props, rows: Sequence[dict], region_rows: Sequence[dict] = (),
              scale: int = 4) -> Image.Image:
  """One held-out scene, upscaled: UPN proposals (left), the referring answers (middle: each
  expression's number at the box it chose, several numbers when several chose one box) and a
  legend (right) listing every expression and every region question with its answer."""
  from PIL import ImageDraw, ImageFont
  font = ImageFont.load_default()
  big = scene.image.resize((scene.image.width * scale, scene.image.height * scale), Image.NEAREST)
  fine, coarse = props.boxes["fine"] * scale, props.boxes["coarse"] * scale
  left = draw_boxes(big, np.concatenate([coarse, fine]),
                    colors=[COARSE] * len(coarse) + [FINE] * len(fine))
  middle = big.copy()
  draw = ImageDraw.Draw(middle)
  for r in rows:
    _dashed(draw, np.asarray(r["gt_box"]) * scale, GT)
  by_box: dict[tuple, list[int]] = {}
  for i, r in enumerate(rows):
    if r["pred_box"] is not None:
      by_box.setdefault(tuple(r["pred_box"]), []).append(i)
  if by_box:
    boxes = np.asarray(list(by_box), np.float64) * scale
    labels = [",".join(str(i + 1) for i in idx) for idx in by_box.values()]
    colors = [HIT if all(rows[i]["hit"] for i in idx) else MISS for idx in by_box.values()]
    middle = draw_boxes(middle, boxes, labels=labels, colors=colors)
  lines = [("referring (number: expression -> hit / miss)", (0, 0, 0))]
  for i, r in enumerate(rows):
    expression = r["question"].split("detect ")[-1].split(" in this")[0]
    verdict = "hit" if r["hit"] else ("no object" if r["pred_box"] is None else "miss")
    lines.append((f"{i + 1}: {expression} -> {verdict}", HIT if r["hit"] else MISS))
  if region_rows:
    lines.append(("", (0, 0, 0)))
    lines.append(("category of <objK> (answer / truth)", (0, 0, 0)))
    for r in region_rows:
      lines.append((f"{C.object_token(r['candidate'])}: {r['phrase']} / {r['category']}",
                    HIT if r["hit"] else MISS))
  line_h = 12
  legend = Image.new("RGB", (260, max(left.height, line_h * len(lines) + 8)), (255, 255, 255))
  ldraw = ImageDraw.Draw(legend)
  for k, (text, color) in enumerate(lines):
    ldraw.text((4, 4 + k * line_h), text, fill=color, font=font)
  canvas = Image.new("RGB", (left.width * 2 + legend.width + 16, legend.height), (255, 255, 255))
  canvas.paste(left, (0, 0))
  canvas.paste(middle, (left.width + 8, 0))
  canvas.paste(legend, (2 * left.width + 16, 0))
  return canvas


def write_visualisations(folder: pathlib.Path, scenes, props, rows: Sequence[dict], num: int,
                         region_rows: Sequence[dict] = ()) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  by_scene: dict[str, list] = {}
  for r in rows:
    by_scene.setdefault(r["scene"], []).append(r)
  regions_by_scene: dict[str, list] = {}
  for r in region_rows:
    regions_by_scene.setdefault(r["scene"], []).append(r)
  for i, (scene, prop) in enumerate(zip(scenes[:num], props[:num])):
    visualise(scene, prop, by_scene.get(scene.key, []), regions_by_scene.get(scene.key, [])
              ).save(folder / f"heldout_{i:02d}.png")


def write(root: pathlib.Path, report: dict) -> None:
  """report.md and report.json (the JSON last, atomically: its presence marks a finished run)."""
  (root / "report.md").write_text(markdown(report))
  write_json(root, report)
