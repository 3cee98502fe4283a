"""`chatrex-jax eval`: metrics from prediction files, or a model run on a RexSeek-style benchmark.

  chatrex-jax eval run --checkpoint CKPT --annotations ann.jsonl --image-dir IMAGES --out DIR
      [--batch-size 4] [--max-new-tokens 100] [--limit N]
    Runs the jitted ChatRex pipeline (batched, fixed shapes: the last batch is padded by
    repeating its last sample; with several devices each batch is split over
    gcd(batch size, #devices) of them, params replicated, unless --no-shard) over
    HumanRef-style records (id, image_name, referring,
    candidate_boxes xyxy, answer_boxes, domain, sub_domain) and writes DIR/predictions.jsonl
    ({id, question, raw_response, extracted_predictions, answer_id, candidate_boxes} as RexSeek
    `evaluate_rexseek.py`; candidate_boxes are written xyxy - the official script writes the
    xywh copy it made), then the metrics below. (`chatrex-jax eval --checkpoint ...` = `run`.)
  chatrex-jax eval rexseek --annotations ann.jsonl --predictions P.jsonl [P2 ...] [--names ..] --out DIR
    RexSeek precision / recall / DensityF1 (+ referring accuracy of the top-1 box).
  chatrex-jax eval coco --annotations instances.json --predictions results.json --out DIR
      [--lvis] [--class-agnostic]
    COCO box AP/AR (pycocotools); --lvis reads an LVIS file and applies the federated filter.
  chatrex-jax eval refcoco --refs 'refs(unc).p' --instances instances.json --split testA
      --predictions P.jsonl --out DIR
    RefCOCO-family referring accuracy; prediction ids are "<ref_id>_<sent_id>".
  chatrex-jax eval proposal-recall --annotations instances.json --predictions proposals.json
      --out DIR [--max-proposals 100] [--iou 0.5]
    The paper's class-agnostic proposal recall at IoU 0.5 (+ one-to-one detection recall).

Every subcommand writes DIR/metrics.md (markdown table) and DIR/metrics.json. Any path may be
an object-store URL (gs://...): inputs are downloaded to a temporary folder first and --out is
uploaded when the command succeeds.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
import contextlib
import json
import pathlib
import pickle
import sys
from typing import Sequence
import uuid

import numpy as np

from chatrex_jax import storage
from chatrex_jax.errors import atomic_path, command
from chatrex_jax.eval import coco as coco_lib
from chatrex_jax.eval import density_f1 as df1
from chatrex_jax.eval import recall as recall_lib
from chatrex_jax.eval import referring as ref_lib
from chatrex_jax.ops import boxes as box_ops

QUESTION_TEMPLATE = "Please detect [OBJ] in this image. Answer the question with object indexes."
MAX_CANDIDATES = 100


def _write(out: pathlib.Path, md: str, js: dict) -> None:
  out.mkdir(parents=True, exist_ok=True)
  for name, text in (("metrics.md", md), ("metrics.json", json.dumps(js, indent=2, ensure_ascii=False))):
    with atomic_path(out / name) as tmp:
      tmp.write_text(text, encoding="utf-8")
  print(md)
  print(f"wrote {out / 'metrics.md'} and {out / 'metrics.json'}")


def _kv_table(title: str, d: dict) -> str:
  rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                   for k, v in d.items())
  return f"# {title}\n\n| metric | value |\n|---|---|\n{rows}\n"


# -- metric subcommands -------------------------------------------------------------------

def rexseek_metrics(gt_data: Sequence[dict], pred_files: dict[str, list[dict]]) -> tuple[str, dict]:
  results = {name: df1.evaluate_dataset(gt_data, preds) for name, preds in pred_files.items()}
  md, js = df1.comparison_tables(results)
  acc = {name: ref_lib.accuracy_from_records(gt_data, preds).to_dict()
         for name, preds in pred_files.items()}
  js["referring_accuracy"] = acc
  md += "\n## Referring accuracy (top-1 box IoU >= 0.5, rejection domain excluded)\n\n"
  md += df1._md_table(["Model", "Accuracy", "Correct", "Samples"],
                      [[n, f"{a['accuracy']:.3f}", a["correct"], a["total"]] for n, a in acc.items()])
  return md + "\n", js


def _cmd_rexseek(args) -> int:
  gt = df1.read_jsonl(args.annotations)
  names = list(args.names or [])
  names += [pathlib.Path(p).stem for p in args.predictions[len(names):]]
  preds = {n: df1.read_jsonl(p) for n, p in zip(names, args.predictions)}
  md, js = rexseek_metrics(gt, preds)
  _write(pathlib.Path(args.out), md, js)
  return 0


def _cmd_coco(args) -> int:
  gt = coco_lib.load_lvis(args.annotations) if args.lvis else coco_lib.load_coco(args.annotations)
  results = coco_lib.read_results(args.predictions)
  if args.lvis:
    results = coco_lib.lvis_federated_filter(gt, results)
  stats = coco_lib.evaluate_boxes(gt, results, use_cats=not args.class_agnostic)
  title = ("LVIS-style" if args.lvis else "COCO") + " box AP/AR (pycocotools)"
  _write(pathlib.Path(args.out), _kv_table(title, stats), stats)
  return 0


def _xyxy_from_coco(bboxes) -> np.ndarray:
  """COCO `bbox` lists (xywh) -> float64 [N, 4] xyxy ([0, 4] for none)."""
  return box_ops.xywh_to_xyxy(np.asarray(bboxes, np.float64).reshape(-1, 4))


def _cmd_proposal_recall(args) -> int:
  gt = coco_lib.load_coco(args.annotations)
  results = coco_lib.read_results(args.predictions)
  by_img = defaultdict(list)
  for r in results:
    by_img[r["image_id"]].append(r)
  gts, gls, props, pls, pss = [], [], [], [], []
  for img_id in sorted(gt.getImgIds()):
    anns = [a for a in gt.imgToAnns.get(img_id, []) if not a.get("iscrowd", 0)]
    gts.append(_xyxy_from_coco([a["bbox"] for a in anns]))
    gls.append([a["category_id"] for a in anns])
    rs = sorted(by_img.get(img_id, []), key=lambda r: -r.get("score", 1.0))
    props.append(_xyxy_from_coco([r["bbox"] for r in rs]))
    pls.append([r.get("category_id", -1) for r in rs])
    pss.append([r.get("score", 1.0) for r in rs])
  prop = recall_lib.proposal_recall(gts, props, args.iou, max_proposals=args.max_proposals)
  det = recall_lib.detection_recall(gts, gls, props, pls, pss, args.iou)
  js = {"proposal_recall": prop.to_dict(), "detection_recall": det.to_dict(), "iou": args.iou,
        "max_proposals": args.max_proposals}
  md = _kv_table(f"Recall @ IoU {args.iou}", {
      "proposal recall (any proposal covers GT)": prop.pooled,
      "proposal recall (mean per image)": prop.per_image_mean,
      "detection recall (one-to-one, same category)": det.pooled,
      "GT boxes": prop.total})
  _write(pathlib.Path(args.out), md, js)
  return 0


def _cmd_refcoco(args) -> int:
  refs = ref_lib.load_refs(args.refs)
  samples = ref_lib.refcoco_samples(refs, args.instances, args.split)
  if not samples:
    raise ValueError(f"no referring sentences in split {args.split!r}")
  lookup = {str(p["id"]): p.get("extracted_predictions", []) for p in df1.read_jsonl(args.predictions)}
  missing = sum(s.sample_id not in lookup for s in samples)
  preds = [ref_lib.top1_box(lookup.get(s.sample_id, [])) for s in samples]
  res = ref_lib.referring_accuracy(preds, [s.gt_box for s in samples], args.iou)
  js = dict(res.to_dict(), split=args.split, iou=args.iou, missing_predictions=missing)
  _write(pathlib.Path(args.out), _kv_table(f"Referring accuracy ({args.split}, top-1 IoU >= "
                                           f"{args.iou})", js), js)
  return 0


# -- model run ----------------------------------------------------------------------------

def _load_image(image_dir: pathlib.Path, name: str):
  from PIL import Image
  path = image_dir / name
  if not path.exists():
    raise FileNotFoundError(f"image {name!r} not found under {image_dir}")
  with Image.open(path) as im:
    return im.convert("RGB")


def prediction_record(sample: dict, question: str, raw: str, candidates) -> dict:
  """One official prediction line (answer_id: a random uuid hex, as shortuuid in RexSeek)."""
  from chatrex_jax.protocol.grammar import parse_first_group
  parsed = parse_first_group(raw, np.asarray(candidates, np.float64).reshape(-1, 4))
  return {"id": sample["id"], "question": question, "raw_response": raw,
          "extracted_predictions": parsed.extracted_predictions,
          "answer_id": uuid.uuid4().hex[:22],
          "candidate_boxes": [list(map(float, b)) for b in candidates]}


def data_parallel(pipe, batch_size: int, devices=None):
  """A copy of `pipe` whose batches are split over the devices along the batch axis (params
  replicated; jit propagates the sharding through embedding and generation). Uses
  gcd(batch_size, #devices) devices; returns (pipe, number of devices used) - the pipe
  unchanged when only one device would be used."""
  import math

  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from chatrex_jax.inference.pipeline import ChatRexPipeline
  devices = list(jax.devices() if devices is None else devices)
  n = math.gcd(batch_size, len(devices))
  if n <= 1:
    return pipe, 1
  mesh = Mesh(np.asarray(devices[:n]), ("data",))
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

  class _DataParallelPipeline(ChatRexPipeline):
    def prepare(self, samples):
      batch = super().prepare(samples)
      return {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}

  params = jax.device_put(pipe.params, NamedSharding(mesh, PartitionSpec()))
  return _DataParallelPipeline(pipe.config, params, pipe.processor, max_objects=pipe.max_objects,
                               seq_bucket=pipe.seq_bucket), n


def run_model(pipe, samples: Sequence[dict], image_dir, *, batch_size: int = 4,
              max_new_tokens: int = 100, question_template: str = QUESTION_TEMPLATE,
              progress: bool = True) -> list[dict]:
  """Greedy answers of a `ChatRexPipeline` for RexSeek-style records -> prediction records.
  Batches have a fixed size (the last one padded with copies of its last sample), so the
  jitted embedding and generation functions compile once."""
  from tqdm import tqdm
  image_dir = pathlib.Path(image_dir)
  out = []
  bar = tqdm(total=len(samples), desc="eval", unit="sample", disable=not progress)
  for start in range(0, len(samples), batch_size):
    batch = list(samples[start:start + batch_size])
    real = len(batch)
    batch += [batch[-1]] * (batch_size - real)
    images = [_load_image(image_dir, s["image_name"]) for s in batch]
    questions = [question_template.replace("[OBJ]", s["referring"]) for s in batch]
    cands = [np.asarray(s["candidate_boxes"][:MAX_CANDIDATES], np.float64).reshape(-1, 4)
             for s in batch]
    preds = pipe.run_batch(images, questions, cands, max_new_tokens=max_new_tokens)
    for s, q, p, c in list(zip(batch, questions, preds, cands))[:real]:
      out.append(prediction_record(s, q, p.answer, c))
    bar.update(real)
  bar.close()
  return out


def _cmd_run(args) -> int:
  from chatrex_jax.inference.pipeline import ChatRexPipeline
  gt = df1.read_jsonl(args.annotations)
  if args.limit is not None:
    gt = gt[:args.limit]
  for s in gt:
    missing = [k for k in ("id", "image_name", "referring", "candidate_boxes") if k not in s]
    if missing:
      raise ValueError(f"annotation {s.get('id')!r} lacks {missing}")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  pipe = ChatRexPipeline.from_checkpoint(args.checkpoint)
  if not args.no_shard:
    pipe, n = data_parallel(pipe, args.batch_size)
    if n > 1:
      print(f"batches split over {n} devices")
  preds = run_model(pipe, gt, args.image_dir, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, question_template=args.question_template,
                    progress=not args.no_progress)
  with atomic_path(out / "predictions.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
    for p in preds:
      f.write(json.dumps(p, ensure_ascii=False) + "\n")
  print(f"wrote {len(preds)} predictions to {out / 'predictions.jsonl'}")
  if all("answer_boxes" in s and "domain" in s and "sub_domain" in s for s in gt):
    md, js = rexseek_metrics(gt, {args.name: preds})
    _write(out, md, js)
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="chatrex-jax eval", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)

  r = sub.add_parser("run", help="run a checkpoint on a RexSeek-style annotations JSONL")
  r.add_argument("--checkpoint", required=True)
  r.add_argument("--annotations", required=True)
  r.add_argument("--image-dir", required=True)
  r.add_argument("--out", required=True)
  r.add_argument("--batch-size", type=int, default=4)
  r.add_argument("--max-new-tokens", type=int, default=100)
  r.add_argument("--limit", type=int, default=None, help="first N samples only")
  r.add_argument("--question-template", default=QUESTION_TEMPLATE)
  r.add_argument("--name", default="ChatRex-JAX", help="model name in the tables")
  r.add_argument("--no-progress", action="store_true")
  r.add_argument("--no-shard", action="store_true",
                 help="run on one device even when several exist")
  r.set_defaults(fn=_cmd_run)

  s = sub.add_parser("rexseek", help="RexSeek precision/recall/DensityF1 from predictions JSONL")
  s.add_argument("--annotations", required=True)
  s.add_argument("--predictions", required=True, nargs="+")
  s.add_argument("--names", nargs="*")
  s.add_argument("--out", required=True)
  s.set_defaults(fn=_cmd_rexseek)

  c = sub.add_parser("coco", help="COCO / LVIS box AP/AR with pycocotools")
  c.add_argument("--annotations", required=True)
  c.add_argument("--predictions", required=True, help="COCO results (JSON list or JSONL)")
  c.add_argument("--lvis", action="store_true")
  c.add_argument("--class-agnostic", action="store_true")
  c.add_argument("--out", required=True)
  c.set_defaults(fn=_cmd_coco)

  rc = sub.add_parser("refcoco", help="RefCOCO/+/g referring accuracy (top-1 IoU >= 0.5)")
  rc.add_argument("--refs", required=True, help="refs(unc).p etc. (read with a restricted unpickler)")
  rc.add_argument("--instances", required=True, help="the refer dataset's instances.json")
  rc.add_argument("--split", required=True, help="val / testA / testB / test")
  rc.add_argument("--predictions", required=True,
                  help="JSONL {id: '<ref_id>_<sent_id>', extracted_predictions: [[x0,y0,x1,y1], ...]}")
  rc.add_argument("--iou", type=float, default=0.5)
  rc.add_argument("--out", required=True)
  rc.set_defaults(fn=_cmd_refcoco)

  pr = sub.add_parser("proposal-recall", help="proposal / detection recall at IoU 0.5")
  pr.add_argument("--annotations", required=True)
  pr.add_argument("--predictions", required=True, help="proposals as COCO results")
  pr.add_argument("--max-proposals", type=int, default=None)
  pr.add_argument("--iou", type=float, default=0.5)
  pr.add_argument("--out", required=True)
  pr.set_defaults(fn=_cmd_proposal_recall)
  return p


# Arguments naming files or folders that are read; `--out` is the one written.
_INPUTS = ("checkpoint", "annotations", "image_dir", "predictions", "refs", "instances")


def _run_staged(args) -> int:
  """Runs the command on local paths: gs:// inputs are downloaded first, a gs:// --out is
  written locally and uploaded when the command succeeds."""
  with contextlib.ExitStack() as stack:
    for name in _INPUTS:
      value = getattr(args, name, None)
      if isinstance(value, list):
        setattr(args, name, [stack.enter_context(storage.local_input(v)) for v in value])
      elif value:
        setattr(args, name, stack.enter_context(storage.local_input(value)))
    args.out = stack.enter_context(storage.local_output(args.out))
    return int(args.fn(args) or 0)


@command("eval")
def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0].startswith("--") and "--checkpoint" in argv:
    argv = ["run"] + argv
  args = build_parser().parse_args(argv)
  try:
    return _run_staged(args)
  except (ValueError, FileNotFoundError, pickle.UnpicklingError) as e:
    print(f"chatrex-jax eval: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
