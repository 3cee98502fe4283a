"""The Apache Beam pipeline and its resumable driver.

Graph of one wave (DirectRunner by default; any runner through `config.beam`)::

    Create(the wave's pending shard ids) | Reshuffle | read each shard's item refs
      | Reshuffle | BatchElements(batch_size)
      | Load | Caption | Converse | Phrases | Ground | Describe | Verify | Finalize (one DoFn each;
      |   the model DoFns build their backend in `setup`, i.e. once per worker, and
      |   call it on whole batches)
      | key by shard | GroupByKey | WriteShard (records + error log + completion marker)

The driver (`run`) lists the sources, assigns every item to a shard by its stable key,
checks the plan of an earlier run, and runs the pending shards in waves of
`shards_per_wave` (0 = a single Beam run). A killed run loses at most the shards of the
wave in flight; the rerun skips completed shards and rewrites the rest (the same bytes
with deterministic backends; never a duplicate or a gap). After the last wave it writes
manifest.json and the TFDS metadata and prints
a summary (kept/dropped per stage and why).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from chatrex_jax import storage
from chatrex_jax.data import schema
from chatrex_jax.errors import UserError
from data_engine import filters as filters_lib
from data_engine import sources as sources_lib
from data_engine import stages, writer


class RunMismatchError(UserError, RuntimeError):
  """--output holds a run made with another config or inputs."""

ENGINE_VERSION = "data-engine-1"
# config keys that do not change the output (excluded from the plan fingerprint)
OPERATIONAL_KEYS = ("beam", "shards_per_wave", "wave_pause_s", "timeout_s")


def _log(msg: str) -> None:
  print(f"[data-engine] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- Beam DoFns
class StageFn(beam.DoFn):
  """One stage over a batch (list) of work items; its backend is built in setup(), i.e.
  once per worker (and shared between stages through the backend cache)."""

  def __init__(self, stage: str, cfg: dict[str, Any]):
    self.stage, self.cfg = stage, cfg
    self._counters: dict[str, Any] = {}

  def setup(self):
    from data_engine import backends, phrases
    c = self.cfg
    timeout = c.get("timeout_s") or None
    if self.stage == "load":
      f = filters_lib.ImageFilter(filters_lib.FilterConfig(**c["filters"]))
      self.fn = lambda b: stages.stage_load(b, f)
    elif self.stage == "caption":
      vlm = backends.build(c["backends"]["vlm"])
      self.fn = lambda b: stages.stage_caption(b, vlm, c["caption"], timeout)
    elif self.stage == "converse":
      vlm = backends.build(c["backends"]["vlm"]) if c["conversations"].get("enabled") else None
      self.fn = lambda b: stages.stage_converse(b, vlm, c["conversations"], timeout)
    elif self.stage == "phrases":
      ex = phrases.PhraseExtractor(phrases.PhraseConfig(**{
          k: tuple(v) if isinstance(v, list) else v for k, v in c["phrases"].items()}))
      self.fn = lambda b: stages.stage_phrases(b, ex)
    elif self.stage == "ground":
      g = backends.build(c["backends"]["grounding"])
      self.fn = lambda b: stages.stage_ground(b, g, c["grounding"], timeout)
    elif self.stage == "describe":
      vlm = backends.build(c["backends"]["vlm"])
      self.fn = lambda b: stages.stage_describe(b, vlm, timeout)
    elif self.stage == "verify":
      v = backends.build(c["backends"]["verifier"])
      self.fn = lambda b: stages.stage_verify(b, v, c["verify"], timeout)
    elif self.stage == "finalize":
      self.fn = stages.stage_finalize
    else:
      raise ValueError(f"unknown stage {self.stage!r}")

  def _count(self, name: str, n: int):
    if n:
      if name not in self._counters:
        self._counters[name] = Metrics.counter("data_engine", f"{self.stage}.{name}")
      self._counters[name].inc(n)

  def process(self, batch):
    batch = list(batch)
    before = sum(it["status"] == "ok" for it in batch)
    self.fn(batch)
    after = sum(it["status"] == "ok" for it in batch)
    self._count("in", before)
    self._count("kept", after)
    self._count("left", before - after)
    yield batch


class WriteShardFn(beam.DoFn):
  """(shard, items) -> the shard's records, error log and completion marker."""

  def __init__(self, out: str, name: str, split: str, num_shards: int):
    self.out, self.name, self.split, self.num_shards = out, name, split, num_shards

  def process(self, kv):
    shard, items = kv
    marker = writer.write_shard(self.out, self.name, self.split, shard, self.num_shards,
                                list(items))
    Metrics.counter("data_engine", "shards_written").inc()
    Metrics.counter("data_engine", "records_written").inc(marker["num_records"])
    yield shard


def _new_item(ref: dict[str, Any]) -> dict[str, Any]:
  return stages.new_item(ref, ref["shard"])


def _slim_batch(batch: list[dict[str, Any]]):
  return [(it["shard"], stages.slim(it)) for it in batch]


def refs_path(out: str, shard: int) -> str:
  return os.path.join(out, writer.STATE, "refs", f"shard-{shard:05d}.jsonl")


def _read_refs(shard: int, out: str) -> list[dict[str, Any]]:
  """The item references of one shard (written by the driver), read on the worker."""
  with open(refs_path(out, shard)) as f:
    return [json.loads(line) for line in f if line.strip()]


def build_wave(p, shards: list[int], cfg: dict[str, Any], out: str, num_shards: int):
  """Add one wave's transforms to pipeline `p`. Only shard ids travel in the job graph;
  workers read each shard's references from `_state/refs/` (so `out` must be a path all
  workers see: local disk for the DirectRunner, a shared/FUSE mount for clusters)."""
  bs = max(1, int(cfg.get("batch_size", 8)))
  items = (p
           | "Shards" >> beam.Create(shards, reshuffle=False)
           | "Spread" >> beam.Reshuffle()
           | "Refs" >> beam.FlatMap(_read_refs, out)
           | "SpreadItems" >> beam.Reshuffle()
           | "NewItem" >> beam.Map(_new_item)
           | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=bs))
  for stage in ("load", "caption", "converse", "phrases", "ground", "describe", "verify",
                "finalize"):
    items = items | stage.capitalize() >> beam.ParDo(StageFn(stage, cfg))
  return (items
          | "Slim" >> beam.FlatMap(_slim_batch)
          | "ByShard" >> beam.GroupByKey()
          | "Write" >> beam.ParDo(WriteShardFn(out, cfg["name"], cfg["split"], num_shards)))


def pipeline_options(cfg: dict[str, Any]):
  from apache_beam.options.pipeline_options import PipelineOptions
  b = dict(cfg.get("beam", {}))
  args = list(b.pop("pipeline_args", []) or [])
  runner = b.pop("runner", "DirectRunner")
  kwargs = {"runner": runner}
  if runner in ("DirectRunner", "direct"):
    kwargs.update(direct_num_workers=int(b.pop("direct_num_workers", 1)),
                  direct_running_mode=b.pop("direct_running_mode", "in_memory"))
  kwargs.update({k: v for k, v in b.items() if v is not None})
  return PipelineOptions(args, **kwargs)


# -------------------------------------------------------------------------- driver
def fingerprint(cfg: dict[str, Any]) -> str:
  core = {k: v for k, v in cfg.items() if k not in OPERATIONAL_KEYS}
  return hashlib.sha1(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()


def list_refs(cfg: dict[str, Any]) -> tuple[list[dict], list[dict]]:
  """All item references (duplicates by key dropped, first wins) + per-source summary."""
  refs, seen, summary = [], set(), []
  for spec in cfg["sources"]:
    n = dup = 0
    for ref in sources_lib.list_items(spec):
      if ref["key"] in seen:
        dup += 1
        continue
      seen.add(ref["key"])
      refs.append(ref)
      n += 1
    summary.append({"name": spec.get("name") or spec["kind"], "kind": spec["kind"],
                    "num_items": n, "duplicates_skipped": dup})
  return refs, summary


def plan(cfg: dict[str, Any], out: str, refs: list[dict], overwrite: bool = False) -> int:
  """Check or create `_state/plan.json`; returns num_shards."""
  keys_sha1 = hashlib.sha1("\n".join(sorted(r["key"] for r in refs)).encode()).hexdigest()
  num_shards = int(cfg.get("num_shards") or 0) or max(
      1, math.ceil(len(refs) / max(1, int(cfg.get("records_per_shard", 1000)))))
  new = {"fingerprint": fingerprint(cfg), "keys_sha1": keys_sha1, "num_items": len(refs),
         "num_shards": num_shards, "engine_version": ENGINE_VERSION,
         "schema_version": schema.SCHEMA_VERSION}
  path = os.path.join(out, writer.STATE, "plan.json")
  if os.path.exists(path) and not overwrite:
    with open(path) as f:
      old = json.load(f)
    if old != new:
      diff = [k for k in new if old.get(k) != new[k]]
      raise RunMismatchError(f"{out} holds a run with a different {diff}; resume with the same "
                         "config and inputs, pick a new --output, or pass --overwrite")
  elif os.path.exists(path) and overwrite:
    for name in os.listdir(os.path.join(out, writer.STATE)):
      if name.endswith(".done.json"):
        os.remove(os.path.join(out, writer.STATE, name))
    if os.path.exists(os.path.join(out, "manifest.json")):
      os.remove(os.path.join(out, "manifest.json"))
  writer.atomic_write(path, json.dumps(new, sort_keys=True, indent=1))
  return num_shards


def _remove_temporaries(out: str) -> None:
  """Delete `*.tmp-*` files a killed run left behind (never complete files)."""
  for sub in ("", writer.STATE, writer.ERRORS, os.path.join(writer.STATE, "refs")):
    d = os.path.join(out, sub)
    if os.path.isdir(d):
      for name in os.listdir(d):
        if ".tmp-" in name:
          os.remove(os.path.join(d, name))


def run(cfg: dict[str, Any], out: str, overwrite: bool = False) -> dict[str, Any]:
  """Run (or resume) the engine into `out`; returns the manifest dict.

  An object-store `out` (gs://...) is written through a local staging folder
  (`storage.staging_dir`: the same URL, the same folder, so a rerun on the same machine resumes
  there): ArrayRecord's writer and the resume state need a local filesystem. When the run is
  complete, the shards, error logs and metadata are uploaded, `manifest.json` last, so a reader
  who finds the manifest finds every shard it counts; the resume state stays local.
  """
  if storage.is_remote(out):
    staged = storage.staging_dir(out)
    remote = storage.path(out)
    if ((remote / "manifest.json").exists() and not overwrite
        and not os.path.exists(os.path.join(staged, writer.STATE, "plan.json"))):
      raise RunMismatchError(
          f"{out} already holds a dataset that was not staged on this machine ({staged} is "
          "empty): pass --overwrite to replace it, or write to another folder")
    _log(f"{out}: staged in {staged}, uploaded when the run is complete")
    manifest = run(cfg, staged, overwrite)
    # Readers find shards through the manifest: without one the folder reads as unfinished
    # while its shards are replaced, and the new manifest goes up last.
    if (remote / "manifest.json").exists():
      (remote / "manifest.json").unlink()
    uploaded = storage.upload_tree(staged, out, exclude=(writer.STATE,), replace=True)
    _log(f"uploaded {len(uploaded)} files to {out}")
    return manifest
  t0 = time.time()
  os.makedirs(out, exist_ok=True)
  _remove_temporaries(out)
  refs, source_summary = list_refs(cfg)
  num_shards = plan(cfg, out, refs, overwrite)
  by_shard: dict[int, list[dict]] = {i: [] for i in range(num_shards)}
  for r in refs:
    r = dict(r, shard=schema.shard_of(r["key"], num_shards))
    by_shard[r["shard"]].append(r)
  pending = [i for i in range(num_shards) if not writer.is_done(out, i)]
  _log(f"{len(refs)} items in {num_shards} shards; {num_shards - len(pending)} already done, "
       f"{len(pending)} to run" + (" [SYNTHETIC SCENES]" if any(
           s["kind"] == "synthetic" for s in cfg["sources"]) else ""))
  for i in [i for i in pending if not by_shard[i]]:  # empty shards need no Beam
    writer.write_shard(out, cfg["name"], cfg["split"], i, num_shards, [])
  pending = [i for i in pending if by_shard[i]]
  for i in pending:
    writer.atomic_write(refs_path(out, i), "".join(json.dumps(r, sort_keys=True) + "\n"
                                                   for r in by_shard[i]))
  wave = int(cfg.get("shards_per_wave", 0)) or max(1, len(pending))
  done_items = 0
  todo_items = sum(len(by_shard[i]) for i in pending)
  for w in range(0, len(pending), wave):
    shards = pending[w:w + wave]
    wave_refs = [r for i in shards for r in by_shard[i]]  # for progress counts
    tw = time.time()
    with beam.Pipeline(options=pipeline_options(cfg)) as p:
      build_wave(p, shards, cfg, out, num_shards)
    done_items += len(wave_refs)
    dt = time.time() - tw
    _log(f"wave {w // wave + 1}/{math.ceil(len(pending) / wave)}: shards {shards[0]}..{shards[-1]} "
         f"{len(wave_refs)} items in {dt:.1f}s ({len(wave_refs) / max(dt, 1e-9):.1f} items/s); "
         f"{done_items}/{todo_items} items of this run done")
    if cfg.get("wave_pause_s"):
      time.sleep(float(cfg["wave_pause_s"]))
  markers = writer.read_markers(out, num_shards)
  core_cfg = {k: v for k, v in cfg.items() if k not in OPERATIONAL_KEYS}
  manifest = writer.write_manifest(out, name=cfg["name"], split=cfg["split"], config=core_cfg,
                                   sources=source_summary, markers=markers,
                                   engine_version=ENGINE_VERSION)
  elapsed = time.time() - t0
  with open(os.path.join(out, writer.STATE, "runs.jsonl"), "a") as f:
    f.write(json.dumps({"time": time.time(), "seconds": round(elapsed, 3),
                        "items_run": todo_items, "shards_run": len(pending),
                        "operational": {k: cfg.get(k) for k in OPERATIONAL_KEYS}},
                       default=str) + "\n")
  _log(summary(manifest, elapsed, todo_items))
  return manifest


def summary(manifest: dict[str, Any], elapsed: float | None = None, items_run: int = 0) -> str:
  """Human-readable kept/dropped per stage and why."""
  c = manifest["counts"]
  lines = [f"summary: {c['items']} items -> {c['records']} records, {c['regions']} regions; "
           f"{c['dropped']} dropped, {c['errors']} errors (see errors/*.jsonl)"]
  if elapsed is not None:
    lines[0] += f"; this run: {items_run} items in {elapsed:.1f}s"
  for name, s in manifest["stages"].items():
    why = ", ".join(f"{r}={n}" for r, n in sorted(s["dropped"].items()))
    err = ", ".join(f"{r}={n}" for r, n in sorted(s["errors"].items()))
    lines.append(f"  {name:<9} in={s['in']:<6} kept={s['passed']:<6}"
                 + (f" dropped[{why}]" if why else "") + (f" errors[{err}]" if err else ""))
  if manifest["region_drops"]:
    lines.append("  regions dropped: " + ", ".join(f"{r}={n}" for r, n in
                                                   manifest["region_drops"].items()))
  return "\n".join(lines)
