"""Everything a pod run keeps in an object store (`gs://...`), against a real Cloud Storage API
served on this machine: `gcp-storage-emulator` on a loopback port (`tests/gcs_emulator.py`, which
also adds the `x-goog-generation` header Cloud Storage sends and TensorStore needs), gcsfs
(through `etils.epath`) pointed at it with STORAGE_EMULATOR_HOST and Orbax's TensorStore with
TENSORSTORE_GCS_HTTP_URL.

Shown: the trainer's metrics and atomic files; an Orbax checkpoint round trip; a whole tiny
ChatRex training run whose workdir, data and tokenizer are in the bucket, killed with SIGKILL
after step 9 and resumed with identical losses and data order, then exported to the bucket; `convert` and
`eval` reading and writing the bucket; the data engine writing its shards and manifest there and
the Grain pipeline reading them back. Nothing lands in a local folder named `gs:`.
"""
import json
import os
import re
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chatrex_jax import storage
from chatrex_jax.errors import atomic_path
from chatrex_jax.train import checkpoint as ckpt_lib
from chatrex_jax.train.metrics import MetricWriter, read_jsonl
from tests import gcs_emulator
from tests.builders import free_port, train_cmd, write_train_assets

BUCKET = "chatrex-test"
JAX_ENV = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator's environment, also set in this process while the module runs; downloads
  are cached and staged under a fresh CHATREX_CACHE."""
  cache = tmp_path_factory.mktemp("cache")
  saved = os.environ.get("CHATREX_CACHE")
  os.environ["CHATREX_CACHE"] = str(cache)
  with gcs_emulator.serve(BUCKET, free_port()) as env:
    yield dict(env, CHATREX_CACHE=str(cache))
  if saved is None:
    os.environ.pop("CHATREX_CACHE", None)
  else:
    os.environ["CHATREX_CACHE"] = saved


def _cli(capsys, *args, check=True):
  """`chatrex-jax ARGS` in this process -> (exit status, stderr)."""
  from chatrex_jax import cli
  code = cli.main(list(args))
  err = capsys.readouterr().err
  if check:
    assert code == 0, err[-3000:]
  return code, err


def test_metrics_and_atomic_files_in_a_bucket(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)   # a gs:// path handled as local would appear here as ./gs:
  run = f"gs://{BUCKET}/runs/metrics"
  writer = MetricWriter(run, enabled=True)
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0 / step})
  writer.close()
  resumed = MetricWriter(run, enabled=True)   # a restart appends after the earlier rows
  resumed.write(4, {"loss": 0.25})
  resumed.close()
  assert [(r["step"], r["loss"]) for r in read_jsonl(f"{run}/metrics.jsonl")] == [
      (1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
  events = list(storage.path(f"{run}/tensorboard").iterdir())
  assert len(events) == 2 and all(e.name.startswith("events.out.tfevents") for e in events)
  with atomic_path(f"{run}/config.json") as tmp:
    tmp.write_text('{"task": "chatrex"}')
  assert storage.path(f"{run}/config.json").read_text() == '{"task": "chatrex"}'
  with pytest.raises(RuntimeError), atomic_path(f"{run}/other.json") as tmp:
    tmp.write_text("half")
    raise RuntimeError("the writer failed")
  assert not storage.path(f"{run}/other.json").exists()
  assert not (tmp_path / "gs:").exists()


def test_checkpoint_in_a_bucket_round_trips(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state = {"params": {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones((4,), jnp.bfloat16)},
           "step": jnp.int32(7)}
  ckpt = ckpt_lib.Checkpointer(f"gs://{BUCKET}/runs/ckpt/checkpoints", async_save=False)
  ckpt.save(7, state, {"grain": {"next_index": 56}, "fingerprint": "abc"})
  ckpt.close()
  again = ckpt_lib.Checkpointer(f"gs://{BUCKET}/runs/ckpt/checkpoints", async_save=False)
  assert again.latest_step() == 7
  restored, data = again.restore(7, ckpt_lib.abstract_like(state))
  again.close()
  assert data == {"grain": {"next_index": 56}, "fingerprint": "abc"}
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  assert storage.path(f"gs://{BUCKET}/runs/ckpt/checkpoints/7/data/process_0-of-1.json").exists()
  assert not (tmp_path / "gs:").exists()


def _wait_for_steps(proc, metrics, n, timeout=600):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if storage.path(metrics).exists() and len(read_jsonl(metrics)) >= n:
      return
    time.sleep(0.5)


def test_training_in_a_bucket_resumes_after_kill9_and_exports(gcs, tmp_path, monkeypatch, capsys):
  """Workdir, data and tokenizer in the bucket: a SIGKILL mid-run, a restart that resumes from
  the bucket's checkpoint and repeats the lost steps with identical losses and batches, then
  `convert export` and `convert chatrex` from and to the bucket."""
  monkeypatch.chdir(tmp_path)
  assets = write_train_assets(tmp_path / "assets")
  root = f"gs://{BUCKET}/pod"
  storage.copy_tree(assets / "data", f"{root}/data")
  storage.copy_tree(assets / "tok", f"{root}/tok")
  run = f"{root}/run"
  cmd = train_cmd(assets, run, **{"optim.total_steps": 12, "train.checkpoint_every": 4,
                                  "data.sources": f"[{{'path': '{root}/data', 'weight': 1.0}}]",
                                  "data.tokenizer_dir": f"'{root}/tok'"})
  env = dict(os.environ, **JAX_ENV)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  # Orbax's save of step 8 first waits for step 4's to be committed, so once step 9 is logged
  # the bucket holds a finished checkpoint (4, perhaps 8) however slow the uploads are.
  _wait_for_steps(proc, f"{run}/metrics.jsonl", 9)
  proc.send_signal(signal.SIGKILL)
  out = proc.communicate()[0]
  first = read_jsonl(f"{run}/metrics.jsonl")
  assert 9 <= len(first) < 12, (len(first), out[-3000:])
  resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  found = re.search(r"resumed from step (\d+)", resumed.stdout)
  assert found, resumed.stdout[-2000:]
  restored = int(found.group(1))
  assert restored in (4, 8)
  rows = read_jsonl(f"{run}/metrics.jsonl")
  assert [r["step"] for r in rows] == [r["step"] for r in first] + list(range(restored + 1, 13))
  before = {r["step"]: r for r in first}
  twice = [(r, before[r["step"]]) for r in rows[len(first):] if r["step"] in before]
  assert twice
  for again, once in twice:   # the steps run twice: same loss, same batch
    with capsys.disabled():   # the figures for a report: pytest -s shows them
      print(f"step {again['step']}: loss {once['loss']:.6f} before the kill, {again['loss']:.6f} after")
    assert again["loss"] == once["loss"], again["step"]
    assert again["data_signature"] == once["data_signature"], again["step"]
  steps = sorted(int(p.name) for p in storage.path(f"{run}/checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 12

  _cli(capsys, "convert", "export", "--workdir", run, "--to", f"{root}/export")
  _cli(capsys, "convert", "export", "--workdir", run, "--to", str(tmp_path / "export"))
  remote = storage.path(f"{root}/export")
  local = sorted(p.name for p in (tmp_path / "export").iterdir())
  assert sorted(p.name for p in remote.iterdir()) == local
  for name in local:   # the bucket holds what a local export writes, byte for byte
    assert (remote / name).read_bytes() == (tmp_path / "export" / name).read_bytes(), name
  code, err = _cli(capsys, "convert", "export", "--workdir", run, "--to", f"{root}/export",
                   check=False)
  assert code == 2 and "--overwrite" in err
  _cli(capsys, "convert", "chatrex", "--from", f"{root}/export", "--to", f"{root}/llava", "--layout", "llava")
  index = json.loads(storage.path(f"{root}/llava/model.safetensors.index.json").read_text()) if (
      storage.path(f"{root}/llava/model.safetensors.index.json").exists()) else None
  names = {p.name for p in storage.path(f"{root}/llava").iterdir()}
  assert "config.json" in names and any(n.endswith(".safetensors") for n in names), names
  if index is not None:
    assert set(index["weight_map"].values()) <= names
  assert not (tmp_path / "gs:").exists()


def test_eval_reads_and_writes_a_bucket(gcs, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  root = f"gs://{BUCKET}/eval"
  gt = [{"id": "a", "image_name": "a.jpg", "referring": "dog", "domain": "d", "sub_domain": "s",
         "answer_boxes": [[0, 0, 10, 10]], "candidate_boxes": [[0, 0, 10, 10], [5, 5, 20, 20]]},
        {"id": "b", "image_name": "b.jpg", "referring": "cat", "domain": "d", "sub_domain": "s",
         "answer_boxes": [[0, 0, 8, 8]], "candidate_boxes": [[30, 30, 40, 40]]}]
  preds = [{"id": "a", "extracted_predictions": [[0, 0, 10, 10]]},
           {"id": "b", "extracted_predictions": [[30, 30, 40, 40]]}]
  for name, rows in (("gt.jsonl", gt), ("model.jsonl", preds)):
    storage.path(f"{root}/{name}").write_text("".join(json.dumps(r) + "\n" for r in rows))
  _cli(capsys, "eval", "rexseek", "--annotations", f"{root}/gt.jsonl", "--predictions",
       f"{root}/model.jsonl", "--out", f"{root}/metrics")
  metrics = json.loads(storage.path(f"{root}/metrics/metrics.json").read_text())
  assert metrics["referring_accuracy"]["model"]["correct"] == 1
  assert metrics["referring_accuracy"]["model"]["total"] == 2
  code, err = _cli(capsys, "eval", "rexseek", "--annotations", f"{root}/nothing.jsonl",
                   "--predictions", f"{root}/model.jsonl", "--out", f"{root}/m2", check=False)
  assert code == 2 and "nothing.jsonl does not exist" in err
  assert not storage.path(f"{root}/m2").exists()
  assert not (tmp_path / "gs:").exists()


def test_data_engine_writes_a_bucket_and_grain_reads_it(gcs, tmp_path, monkeypatch):
  pytest.importorskip("apache_beam")
  from chatrex_jax import configs
  from chatrex_jax.data import records
  from chatrex_jax.data.pipeline import RecordSource
  from data_engine import config as config_lib
  from data_engine import pipeline
  monkeypatch.chdir(tmp_path)
  cfg = configs.load_config("data_engine_synthetic:6,64,3")
  configs.set_path(cfg, "num_shards", "2")
  cfg = config_lib.to_plain(cfg)
  out = f"gs://{BUCKET}/engine/scenes"
  manifest = pipeline.run(cfg, out)
  assert manifest["counts"]["records"] == 6
  assert json.loads(storage.path(f"{out}/manifest.json").read_text()) == manifest
  shards = [s["file"] for s in manifest["splits"]["train"]["shards"]]
  assert all(storage.path(f"{out}/{f}").exists() for f in shards)
  assert not storage.path(f"{out}/_state").exists()   # resume state stays in the local staging

  local = tmp_path / "local"
  pipeline.run(cfg, str(local))
  want = {r["key"]: r for r in records.iter_records(str(local))}
  source = RecordSource(out)
  got = {source[i]["key"]: source[i] for i in range(len(source))}
  assert got == want and len(got) == 6

  again = pipeline.run(cfg, out)   # a rerun resumes from the staging folder: nothing redone
  assert again == manifest
  with pytest.raises(pipeline.RunMismatchError, match="--overwrite"):
    os.environ["CHATREX_CACHE"], saved = str(tmp_path / "other-machine"), os.environ["CHATREX_CACHE"]
    try:
      pipeline.run(cfg, out)
    finally:
      os.environ["CHATREX_CACHE"] = saved
  assert not (tmp_path / "gs:").exists()
