"""The whole engine on Beam's DirectRunner: synthetic oracles (exact answers), tiny random
transformers models (real code paths), kill + resume, per-item failure isolation."""
import base64
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("apache_beam")
pytest.importorskip("array_record")
pytest.importorskip("spacy")

from chatrex_jax import configs  # noqa: E402
from chatrex_jax.data import records, schema  # noqa: E402
from data_engine import backends, pipeline, stages, synthetic  # noqa: E402
from data_engine import config as config_lib  # noqa: E402
from data_engine.backends import oracle  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH_CONFIG = "data_engine_synthetic"


def synthetic_cfg(arg: str, **over) -> dict:
  cfg = configs.load_config(f"{SYNTH_CONFIG}:{arg}")
  for k, v in over.items():
    configs.set_path(cfg, k, repr(v))
  return config_lib.to_plain(cfg)


def test_synthetic_scenes_end_to_end_exact(tmp_path):
  out = str(tmp_path / "out")
  cfg = synthetic_cfg("12,128,5", num_shards=3, shards_per_wave=2)
  manifest = pipeline.run(cfg, out)
  assert manifest["counts"] == {"items": 12, "records": 12, "regions": manifest["counts"]["regions"],
                                "dropped": 0, "errors": 0}
  assert manifest["synthetic"] and manifest["schema_version"] == schema.SCHEMA_VERSION
  src = records.EngineRecords(out, check=True)
  assert len(src) == 12
  n_regions = 0
  for i in range(len(src)):
    rec = src[i]
    scene = rec["extra"]["synthetic_scene"]
    assert rec["key"] == schema.make_key("synthetic_scenes", f"5/{scene['index']}")
    assert rec["image"] == synthetic.render_png(scene)  # the bytes as received
    want = {}
    for o in scene["objects"]:
      want[tuple(float(v) for v in o["box"])] = ("coarse", synthetic.referring_expression(
          scene, o["id"]), o["shape"])
      if o["part"]:
        want[tuple(float(v) for v in o["part"]["box"])] = (
            "fine", synthetic.referring_expression(scene, o["id"], part=True), "dot")
    got = {tuple(r["box"]): (r["granularity"], r["referring"], r["category"])
           for r in rec["regions"]}
    assert got == want, rec["key"]
    n_regions += len(rec["regions"])
    for r in rec["regions"]:
      assert r["provenance"]["box"].startswith("oracle-grounding@")
      assert r["provenance"]["phrase"].startswith("spacy-")
    # grounded conversation: every grounded span names its regions' phrase
    assistant = [t for t in rec["conversations"] if t["role"] == "assistant"]
    assert assistant and all(t["groundings"] for t in assistant)
    for t in assistant:
      for g in t["groundings"]:
        span = t["text"][g["start"]:g["end"]].lower()
        for rid in g["region_ids"]:
          assert rec["regions"][rid]["category"] in span
  assert manifest["counts"]["regions"] == n_regions
  info = json.load(open(os.path.join(out, "dataset_info.json")))
  assert sum(int(x) for x in info["splits"][0]["shardLengths"]) == 12
  assert sorted(os.listdir(out)) == sorted(
      ["_state", "errors", "manifest.json", "dataset_info.json", "features.json"]
      + [schema.shard_filename("synthetic_scenes", "train", i, 3) for i in range(3)])
  # Grain reads it
  import grain
  ds = grain.MapDataset.source(src).map(lambda r: len(r["regions"]))
  assert sum(ds[i] for i in range(len(ds))) == n_regions

  # a rerun of a finished output is a no-op with the same manifest; another config refuses
  before = open(os.path.join(out, "manifest.json")).read()
  t = time.time()
  pipeline.run(cfg, out)
  assert time.time() - t < 10
  assert open(os.path.join(out, "manifest.json")).read() == before
  with pytest.raises(RuntimeError, match="different"):
    pipeline.run(synthetic_cfg("13,128,5", num_shards=3), out)


# ---------------------------------------------------------------- tiny random HF models
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
  from data_engine.backends.tiny import make_tiny_models
  return make_tiny_models(str(tmp_path_factory.mktemp("tiny_models")))


def _hf_backends(dirs):
  return {
      "vlm": {"kind": "hf_vlm", "model_dir": dirs["vlm"], "max_new_tokens": 8,
              "min_new_tokens": 3, "batch_size": 4, "num_threads": 1},
      "grounding": {"kind": "hf_grounding", "model_dir": dirs["grounding"], "box_threshold": 0.0,
                    "max_boxes": 2, "batch_size": 8, "num_threads": 1},
      "verifier": {"kind": "hf_verifier", "model_dir": dirs["llm"], "max_new_tokens": 6,
                   "min_new_tokens": 2, "batch_size": 8, "num_threads": 1},
  }


def test_tiny_hf_models_end_to_end(tmp_path, tiny_models):
  """Folder + JSONL sources with awkward images through the real transformers backends."""
  from data_engine.testing import bad_images
  folder = tmp_path / "images"
  folder.mkdir()
  for i in range(3):
    (folder / f"scene{i}.png").write_bytes(synthetic.render_png(synthetic.make_scene(9, i, 96)))
  for name, data in bad_images().items():
    (folder / f"{name}.{'jpg' if name in ('truncated', 'cmyk') else 'png'}").write_bytes(data)
  manifest_path = tmp_path / "manifest.jsonl"
  png = synthetic.render_png(synthetic.make_scene(9, 10, 96))
  rows = [{"id": "url://a", "image_b64": base64.b64encode(png).decode(), "nsfw": False,
           "caption": "A small red circle next to a large blue square."},
          {"id": "url://b", "image_b64": base64.b64encode(png).decode(), "nsfw": True}]
  manifest_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = config_lib.to_plain(config_lib.base_config())
  cfg.update(name="tiny_hf", num_shards=2, batch_size=4, backends=_hf_backends(tiny_models),
             sources=[{"kind": "folder", "name": "folder", "path": str(folder)},
                      {"kind": "jsonl", "name": "web", "path": str(manifest_path)}])
  cfg["filters"]["min_side"] = 16
  cfg["verify"]["threshold"] = 0.0  # random weights: keep every region to exercise the writer
  cfg["conversations"]["enabled"] = True
  out = str(tmp_path / "out")
  manifest = pipeline.run(cfg, out)

  c = manifest["counts"]
  assert c["items"] == 12
  st = manifest["stages"]
  assert st["load"]["errors"] == {"corrupt": 1, "truncated": 1, "too_large": 1, "empty": 1}
  assert st["filter"]["dropped"] == {"too_small": 1, "nsfw": 1}
  errors = [json.loads(l) for i in range(2)
            for l in open(os.path.join(out, "errors", f"shard-{i:05d}.jsonl"))]
  assert sorted((e["item_id"], e["reason"]) for e in errors) == [
      ("bomb_header.png", "too_large"), ("corrupt.png", "corrupt"), ("empty.png", "empty"),
      ("truncated.jpg", "truncated")]
  # 3 scenes + cmyk + gray16 + the manifest image reach the models; the random models'
  # text is gibberish, but whatever survives is a schema-valid record
  assert st["caption"]["in"] == 6
  recs = list(records.iter_records(out, check=True))
  assert len(recs) == c["records"] >= 1
  for rec in recs:
    for r in rec["regions"]:
      assert r["provenance"]["box"].startswith("hf-grounding@grounding-")
      assert r["provenance"]["description"].startswith("hf-vlm@vlm-")
      assert r["provenance"]["verify"].startswith("hf-verifier@llm-")
    if rec["item_id"] == "url://a":  # the manifest caption wins over the VLM
      assert rec["caption"].startswith("A small red circle")
      assert rec["caption_provenance"]["backend"] == "manifest:web"
    else:
      assert rec["caption_provenance"]["backend"] == "hf-vlm"
    assert [t["role"] for t in rec["conversations"]] == ["user", "assistant"]


def test_kill_midway_and_rerun_gives_identical_output(tmp_path):
  """SIGKILL the CLI after its first finished shard, rerun: same bytes as a clean run."""
  args = ["--config", f"{SYNTH_CONFIG}:30,64,1", "--config.num_shards=6",
          "--config.shards_per_wave=1"]
  ref = str(tmp_path / "ref")
  from data_engine.main import main
  assert main(args + ["--output", ref]) == 0

  out = str(tmp_path / "killed")
  state = os.path.join(out, "_state")
  proc = subprocess.Popen([sys.executable, "-m", "data_engine", *args, "--output", out,
                           "--config.wave_pause_s=1.5"], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 150
  try:
    while time.time() < deadline and proc.poll() is None:
      if os.path.isdir(state) and any(f.endswith(".done.json") for f in os.listdir(state)):
        break
      time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  done = [f for f in os.listdir(state) if f.endswith(".done.json")]
  assert 1 <= len(done) < 6 and not os.path.exists(os.path.join(out, "manifest.json"))
  # debris of a kill during a write: a temporary file and an unmarked shard file
  open(os.path.join(out, "x.array_record.tmp-deadbeef"), "wb").write(b"junk")
  pending = next(i for i in range(6) if f"shard-{i:05d}.done.json" not in done)
  open(os.path.join(out, schema.shard_filename("synthetic_scenes", "train", pending, 6)),
       "wb").write(b"partial")

  assert main(args + ["--output", out]) == 0

  def files(d):
    found = {}
    for root, _, names in os.walk(d):
      for n in names:
        rel = os.path.relpath(os.path.join(root, n), d)
        if rel != os.path.join("_state", "runs.jsonl"):
          found[rel] = open(os.path.join(root, n), "rb").read()
    return found
  a, b = files(ref), files(out)
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k] == b[k], k
  keys = [r["key"] for r in records.iter_records(out)]
  assert len(keys) == len(set(keys)) == 30  # no duplicates, no gaps


# -------------------------------------------------------------- per-item failure isolation
class _FlakyVLM(oracle.OracleVisionLanguage):
  """The oracle VLM, but it raises on one scene and hangs on another."""

  def caption(self, images, metas):
    idx = [m["scene"]["index"] for m in metas]
    if 1 in idx:
      raise RuntimeError("backend crashed on scene 1")
    if 2 in idx:
      time.sleep(1.0)
    return super().caption(images, metas)


def test_backend_failures_and_timeouts_stay_per_item():
  from data_engine import filters
  items = [stages.new_item({"key": f"k{i}", "source": "s", "item_id": str(i), "meta": {},
                            "load": {"kind": "synthetic", "seed": 0, "index": i, "params": {}}},
                           0) for i in range(5)]
  stages.stage_load(items, filters.ImageFilter(filters.FilterConfig()))
  stages.stage_caption(items, _FlakyVLM(), {"use_provided": False}, timeout_s=0.3)
  got = [(it["status"], it["stage"], it["reason"]) for it in items]
  assert got == [("ok", "", ""), ("error", "caption", "backend_error"),
                 ("error", "caption", "timeout"), ("ok", "", ""), ("ok", "", "")]
  assert "crashed on scene 1" in items[1]["detail"]
  assert items[0]["caption"] == synthetic.caption(synthetic.make_scene(0, 0))


def test_backend_registry():
  a = backends.build({"kind": "oracle_vlm"})
  assert a is backends.build({"kind": "oracle_vlm"})  # one instance per process and spec
  assert isinstance(backends.build({"kind": "data_engine.backends.oracle:OracleVerifier"}),
                    backends.VerifierBackend)
  with pytest.raises(ValueError, match="unknown backend kind"):
    backends.build({"kind": "nope"})
  with pytest.raises(ValueError, match="only label synthetic scenes"):
    a.caption([np.zeros((4, 4, 3), np.uint8)], [{}])
  with pytest.raises(FileNotFoundError, match="local directories only"):
    backends.build({"kind": "hf_vlm", "model_dir": "/nonexistent/model"})


def test_tfds_reads_the_output(tmp_path):
  """`tfds.builder_from_directory` opens the engine's output (needs the [tf] extra; checked
  with tensorflow-datasets 4.9.10, which needs no TensorFlow for array_record sources)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  out = str(tmp_path / "out")
  pipeline.run(synthetic_cfg("6,64,3", num_shards=2), out)
  src = tfds.builder_from_directory(out).as_data_source(split="train")
  mine = {r["key"]: r for r in records.iter_records(out)}
  assert len(src) == len(mine) == 6
  for i in range(len(src)):
    rec = records.decode_features(src[i])
    assert rec == mine[rec["key"]]


def test_cli_and_config_overrides():
  from chatrex_jax import cli
  assert cli.COMMANDS["data-engine"][0] == "data_engine.main"
  cfg = configs.load_config(f"{SYNTH_CONFIG}:5,64")
  configs.set_path(cfg, "verify.threshold", "0.75")
  configs.set_path(cfg, "backends.vlm.kind", "oracle_vlm")
  configs.set_path(cfg, "num_shards", "3")
  plain = config_lib.to_plain(cfg)
  assert plain["verify"]["threshold"] == 0.75 and plain["num_shards"] == 3
  assert plain["sources"][0]["num_images"] == 5 and plain["sources"][0]["image_size"] == 64
  with pytest.raises(KeyError, match="no field 'verify.nope'"):
    configs.set_path(cfg, "verify.nope", "1")
  hf = config_lib.to_plain(configs.load_config("data_engine_hf:/models"))
  assert hf["backends"]["grounding"]["model_dir"] == "/models/grounding"
  assert hf["sources"][0]["kind"] == "folder"  # real data: never the synthetic source


def test_tiny_hf_backends_in_bfloat16(tiny_models):
  """The transformers backends cast pixel inputs to the model dtype (bf16 on accelerators)."""
  specs = _hf_backends(tiny_models)
  ims = [np.asarray(synthetic.render(synthetic.make_scene(3, i, 64))) for i in range(2)]
  vlm = backends.build(dict(specs["vlm"], dtype="bfloat16"))
  assert all(isinstance(t, str) for t in vlm.caption(ims, [{}, {}]))
  assert len(vlm.describe_regions(ims, [[0, 0, 30, 30], [5, 5, 60, 60]], ["dot", "circle"],
                                  [{}, {}])) == 2
  grounder = backends.build(dict(specs["grounding"], dtype="bfloat16"))
  for hits in grounder.ground(ims, ["red circle", "dot"], [{}, {}]):
    assert 1 <= len(hits) <= 2
    for (x1, y1, x2, y2), score in hits:
      assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64 and 0 <= score <= 1
  verifier = backends.build(dict(specs["verifier"], dtype="bfloat16"))
  scores = verifier.verify(["circle", "dot"], ["a red circle", "a dot"], [{}, {}])
  assert all(0.0 <= s <= 1.0 for s in scores)
