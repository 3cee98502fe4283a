"""Proposal export: run a UPN over an engine dataset and write records that carry `proposals`.

    python -m chatrex_jax.inference.upn_export --input /data/rexverse --output /data/rexverse_upn \
        --params /runs/upn_tiny --config upn_train_tiny --prompt fine

`--params` is a training workdir of `chatrex-jax train` (the latest Orbax checkpoint's
trainable + frozen parameters) or an official UPN checkpoint file (.pth / .safetensors, the
model section then defaults to UPN-Large unless --config names one). Every record of every
input shard is decoded, gets `proposals = {"boxes": [[x1, y1, x2, y2], ...] (pixels of the
original image, clipped to it), "scores": [...], "provenance": "upn:<prompt>@<tag>"}` (the
official filter: score >= min_score, NMS at nms_iou, descending score), is re-encoded with
`schema.encode` (which validates it) and written to a shard of the same name in --output,
next to a manifest whose `proposals` entry records the settings. `--prompt both` keeps the
union of the fine and coarse proposals (descending score). The MLLM data pipeline mixes these
proposals with the ground truth (`data.proposals` of its config).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from typing import Callable, Sequence

import numpy as np

from chatrex_jax import storage
from chatrex_jax.data import records as records_lib
from chatrex_jax.data import schema

PromptFn = Callable[[list, str], list]   # (PIL images, prompt) -> list of inference.upn.Proposals


def load_trained_params(workdir: str | os.PathLike, step: int | None = None) -> dict:
  """Parameters (trainable merged with frozen) of a `Trainer` checkpoint in workdir/checkpoints."""
  import orbax.checkpoint as ocp

  from chatrex_jax.train.optimizer import merge
  directory = storage.path(workdir) / "checkpoints"   # local or gs://
  if not directory.exists():
    raise FileNotFoundError(f"{directory}: no checkpoints (not a training workdir)")
  mngr = ocp.CheckpointManager(directory, item_names=("state", "data"))
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory}: no finished checkpoint")
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    mngr.close()
  state = out["state"]
  get = (lambda k: state[k]) if isinstance(state, dict) else (lambda k: getattr(state, k))
  return merge(get("trainable"), get("frozen"))


def predictor_fn(params, config, size: int = 800, max_size: int = 1333, min_score: float = 0.3,
                 nms_iou: float | None = 0.8, batch_bucket: int | None = None) -> PromptFn:
  """(images, prompt) -> filtered proposals, with the official preprocessing (`UPNPredictor`;
  batch_bucket: pad batches to a multiple of it, one compilation for every batch size)."""
  from chatrex_jax.inference.upn import UPNPredictor
  pred = UPNPredictor(params, config, size=size, max_size=max_size, batch_bucket=batch_bucket)

  def run(images, prompt):
    return pred.filter(pred(images, prompt), min_score=min_score, nms_iou=nms_iou)
  return run


def proposals_for(images: list, predict: PromptFn, prompt: str) -> list[tuple[np.ndarray, np.ndarray]]:
  """[(boxes [K, 4] float, scores [K])] per image; prompt 'fine' | 'coarse' | 'both'."""
  prompts = ("fine", "coarse") if prompt == "both" else (prompt,)
  per = [[] for _ in images]
  for p in prompts:
    for i, prop in enumerate(predict(images, p)):
      per[i].append((np.asarray(prop.boxes, np.float64).reshape(-1, 4),
                     np.asarray(prop.scores, np.float64).reshape(-1)))
  out = []
  for parts in per:
    boxes = np.concatenate([b for b, _ in parts]) if parts else np.zeros((0, 4))
    scores = np.concatenate([s for _, s in parts]) if parts else np.zeros((0,))
    order = np.argsort(-scores, kind="stable")
    out.append((boxes[order], scores[order]))
  return out


def _open(data: bytes):
  from PIL import Image
  with Image.open(io.BytesIO(data)) as im:
    im.load()
    return im.copy()


def attach(record: dict, boxes: np.ndarray, scores: np.ndarray, provenance: str) -> dict:
  """A copy of record with `proposals` set (boxes clipped to the image)."""
  w, h = float(record["width"]), float(record["height"])
  b = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
  b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0.0, w)
  b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0.0, h)
  out = dict(record)
  out["proposals"] = {"boxes": [[float(v) for v in row] for row in b],
                      "scores": [float(s) for s in np.asarray(scores).reshape(-1)],
                      "provenance": provenance}
  return out


def export_proposals(input_dir: str, output_dir: str, predict: PromptFn, *, prompt: str = "fine",
                     split: str = "train", batch_size: int = 4, provenance: str = "upn",
                     settings: dict | None = None) -> dict:
  """Writes output_dir (same shard names + manifest); returns {"records", "proposals"} counts."""
  from chatrex_jax.inference.upn import load_image
  from data_engine.writer import write_array_record
  if prompt not in ("fine", "coarse", "both"):
    raise ValueError(f"prompt must be fine | coarse | both, got {prompt!r}")
  if os.path.abspath(input_dir) == os.path.abspath(output_dir):
    raise ValueError("--output must differ from --input (the input shards are read while writing)")
  manifest = records_lib.read_manifest(input_dir)
  os.makedirs(output_dir, exist_ok=True)
  tag = f"upn:{prompt}@{provenance}"
  n_rec = n_prop = 0
  for path in records_lib.shard_paths(input_dir, split):
    recs = [schema.decode(buf) for buf in records_lib.read_shard(path)]
    encoded = []
    for start in range(0, len(recs), batch_size):
      chunk = recs[start:start + batch_size]
      images = [load_image(_open(r["image"])) for r in chunk]
      for r, (b, s) in zip(chunk, proposals_for(images, predict, prompt)):
        encoded.append(schema.encode(attach(r, b, s, tag)))   # validates
        n_prop += len(s)
    write_array_record(os.path.join(output_dir, os.path.basename(path)), encoded)
    n_rec += len(encoded)
  for name in os.listdir(input_dir):   # TFDS metadata etc. travel unchanged
    src = os.path.join(input_dir, name)
    if os.path.isfile(src) and ".array_record" not in name and name != records_lib.MANIFEST:
      shutil.copy(src, os.path.join(output_dir, name))
  manifest = dict(manifest)
  manifest["proposals"] = {"provenance": tag, "prompt": prompt, **(settings or {})}
  with open(os.path.join(output_dir, records_lib.MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)
  return {"records": n_rec, "proposals": n_prop}


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m chatrex_jax.inference.upn_export", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", required=True, help="engine output directory (manifest.json + shards)")
  p.add_argument("--output", required=True)
  p.add_argument("--params", required=True, help="training workdir or official UPN checkpoint file")
  p.add_argument("--config", default="", help="UPN config FILE[:ARG] with a model section "
                 "(chatrex_jax/configs/upn_train_tiny.py, chatrex_jax/configs/upn_large.py, ...)")
  p.add_argument("--prompt", default="fine", choices=("fine", "coarse", "both"))
  p.add_argument("--split", default="train")
  p.add_argument("--min-score", type=float, default=0.3)
  p.add_argument("--nms-iou", type=float, default=0.8)
  p.add_argument("--size", type=int, default=800, help="short side (official 800)")
  p.add_argument("--max-size", type=int, default=1333, help="long side cap (official 1333)")
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--tag", default="", help="provenance tag (default: the --params name)")
  args = p.parse_args(argv)
  from chatrex_jax.models.upn.upn import UPNConfig
  from chatrex_jax.train.upn_task import model_config as upn_model_config
  config = None
  if args.config:
    from chatrex_jax.configs import load_config
    model = load_config(args.config).model
    config = upn_model_config(model)
  if os.path.isdir(args.params):
    if config is None:
      raise ValueError("--params is a training workdir: give --config with its model section")
    params = load_trained_params(args.params)
  else:
    from chatrex_jax.convert import upn as convert_upn
    config = config or UPNConfig()
    params, _ = convert_upn.load(args.params, config)
  predict = predictor_fn(params, config, args.size, args.max_size, args.min_score, args.nms_iou)
  settings = dict(min_score=args.min_score, nms_iou=args.nms_iou, size=args.size, max_size=args.max_size)
  stats = export_proposals(args.input, args.output, predict, prompt=args.prompt, split=args.split,
                           batch_size=args.batch_size,
                           provenance=args.tag or os.path.basename(os.path.normpath(args.params)),
                           settings=settings)
  print(json.dumps(stats))
  return 0


if __name__ == "__main__":
  sys.exit(main())
