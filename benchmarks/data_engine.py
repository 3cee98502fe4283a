"""Throughput of the data engine's non-model stages, records/s on ONE core.

    python benchmarks/data_engine.py [--n 300] [--size 128]

The process pins itself to one CPU. Stages are timed in-process on batches of work items
exactly as the Beam DoFns call them (data_engine/stages.py):
  decode+filter  read bytes, header check, decode, RGB conversion, size/NSFW/low-content
                 filters: synthetic PNG scenes (--size px) and 640x480 JPEG photos-like
  spacy          phrase extraction of the caption + 2 conversation answers per record
  finalize       record assembly, schema validation, tf.Example encoding
  write          ArrayRecord writing of the encoded records
and the whole Beam DirectRunner pipeline with the synthetic oracle backends (so model time
is ~0 and what remains is Beam + the non-model stages).

There is no PyTorch reference for a data pipeline: `ref_s`/`speedup` are null. The last
line is one JSON object (docs/architecture.md "Benchmarks output format" keys + `records_per_s_per_core`).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time

from measure import peak_rss_mb

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--n", type=int, default=300)
  ap.add_argument("--size", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  cpu = sorted(os.sched_getaffinity(0))[0]
  os.sched_setaffinity(0, {cpu})

  import numpy as np

  from data_engine import filters, phrases, stages, synthetic, writer
  from data_engine.backends import oracle

  n = args.n
  scenes = [synthetic.make_scene(0, i, args.size) for i in range(n)]

  pngs = [base64.b64encode(synthetic.render_png(s)).decode() for s in scenes]

  def refs_png():  # pre-rendered PNG bytes (the scene meta rides along for the oracles)
    return [{"key": f"{i:08x}", "source": "bench", "item_id": str(i),
             "meta": {"scene": scenes[i]}, "load": {"kind": "inline", "b64": pngs[i]}}
            for i in range(n)]

  jpeg_dir = tempfile.mkdtemp()
  for i in range(min(n, 100)):
    img = synthetic.render(synthetic.make_scene(1, i, 480)).resize((640, 480))
    img.save(os.path.join(jpeg_dir, f"{i}.jpg"), quality=90)

  def refs_jpeg():
    return [{"key": f"{i:08x}", "source": "bench", "item_id": str(i), "meta": {},
             "load": {"kind": "file", "path": os.path.join(jpeg_dir, f"{i % 100}.jpg")}}
            for i in range(n)]

  flt = filters.ImageFilter(filters.FilterConfig(min_side=16))
  extractor = phrases.PhraseExtractor()
  vlm, ground, verif = (oracle.OracleVisionLanguage(), oracle.OracleGrounding(),
                        oracle.OracleVerifier())
  questions = {"enabled": True, "questions": ["What objects are in this image?",
                                               "Which shapes have a dot?"]}

  wall: dict[str, float] = {}

  def median_time(fn, setup, name):
    """Median CPU seconds of `fn` (the process is pinned to one core, so CPU time is the
    per-core cost; wall time on a shared machine is also kept in `wall`)."""
    cpu, w = [], []
    for _ in range(args.repeats):
      state = setup()
      t, tw = time.process_time(), time.perf_counter()
      fn(state)
      cpu.append(time.process_time() - t)
      w.append(time.perf_counter() - tw)
    wall[name] = float(np.median(w))
    return float(np.median(cpu))

  def fresh(refs_fn):
    return lambda: [stages.new_item(r, 0) for r in refs_fn()]

  def loaded():
    items = [stages.new_item(r, 0) for r in refs_png()]
    stages.stage_load(items, flt)
    return items

  def to_phrases():
    items = loaded()
    stages.stage_caption(items, vlm, {"use_provided": False})
    stages.stage_converse(items, vlm, questions)
    return items

  def to_finalize():
    items = to_phrases()
    stages.stage_phrases(items, extractor)
    stages.stage_ground(items, ground, {})
    stages.stage_describe(items, vlm)
    stages.stage_verify(items, verif, {})
    return items

  def to_write():
    items = to_finalize()
    stages.stage_finalize(items)
    return [it["record"] for it in items]

  out_dir = tempfile.mkdtemp()
  secs = {
      "decode_filter_png": median_time(lambda it: stages.stage_load(it, flt), fresh(refs_png),
                                       "decode_filter_png"),
      "decode_filter_jpeg640": median_time(lambda it: stages.stage_load(it, flt),
                                           fresh(refs_jpeg), "decode_filter_jpeg640"),
      "spacy_phrases": median_time(lambda it: stages.stage_phrases(it, extractor), to_phrases,
                                   "spacy_phrases"),
      "finalize_encode": median_time(stages.stage_finalize, to_finalize, "finalize_encode"),
      "write_array_record": median_time(
          lambda recs: writer.write_array_record(os.path.join(out_dir, "bench.ar"), recs),
          to_write, "write_array_record"),
  }
  rate = {k: round(n / v, 1) for k, v in secs.items()}
  for k, v in rate.items():
    print(f"{k:<24} {v:>10.1f} records/s/core  ({secs[k] / n * 1e3:.3f} ms CPU/record, "
          f"{wall[k] / n * 1e3:.3f} ms wall/record)")
  non_model = secs["decode_filter_png"] + secs["spacy_phrases"] + secs["finalize_encode"] + \
      secs["write_array_record"]
  rate["non_model_total_png"] = round(n / non_model, 1)
  print(f"{'non-model total (png)':<24} {rate['non_model_total_png']:>10.1f} records/s/core")

  # whole Beam pipeline, oracle backends
  from chatrex_jax import configs
  from data_engine import config as config_lib
  from data_engine import pipeline
  cfg = config_lib.to_plain(configs.load_config(f"data_engine_synthetic:{n},{args.size}"))
  cfg.update(num_shards=4, shards_per_wave=0)
  beam_out = tempfile.mkdtemp()
  pipeline.run(cfg, beam_out)  # warm-up (imports, spaCy load)
  t, tw = time.process_time(), time.perf_counter()
  pipeline.run(cfg, beam_out + "_2")
  beam_s = time.process_time() - t
  wall["beam"] = time.perf_counter() - tw
  rate["beam_direct_runner_oracles"] = round(n / beam_s, 1)
  print(f"{'beam DirectRunner e2e':<24} {rate['beam_direct_runner_oracles']:>10.1f} records/s/core"
        f"  (wall {n / wall['beam']:.1f} records/s)")
  peak = peak_rss_mb()
  print(json.dumps({
      "name": "data_engine_non_model_stages",
      "config": {"n": n, "image_size": args.size, "jpeg": "640x480", "cores": 1,
                 "timer": "process CPU time, median of repeats",
                 "spacy": extractor.version},
      "ours_s": round(non_model / n, 6), "ref_s": None, "speedup": None,
      "ours_peak_mb": round(peak, 1), "ref_peak_mb": None, "max_abs_err": None,
      "records_per_s_per_core": rate,
  }))


if __name__ == "__main__":
  main()
