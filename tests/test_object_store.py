"""Training files in an object store (`gs://...`) against a real Cloud Storage API served on
this machine: `gcp-storage-emulator` on a loopback port, gcsfs (through `etils.epath`) pointed at
it with STORAGE_EMULATOR_HOST and Orbax's TensorStore with TENSORSTORE_GCS_HTTP_URL.

Shown: the trainer's metrics (rows kept across a resume, TensorBoard events), its atomic files
(config.json) and an Orbax checkpoint of a small state with every process's data position go to
the bucket and come back; nothing lands in a local folder named `gs:`. Not shown here: a whole
training run in the bucket. TensorStore's writes of the tiny ChatRex state (about a thousand
arrays) stall against this emulator (README, "Object stores").
"""
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chatrex_jax import storage
from chatrex_jax.errors import atomic_path
from chatrex_jax.train import checkpoint as ckpt_lib
from chatrex_jax.train.metrics import MetricWriter, read_jsonl
from tests.builders import free_port

BUCKET = "chatrex-test"


@pytest.fixture(scope="module")
def gcs():
  """The emulator's environment, also set in this process while the module runs."""
  port = free_port()
  # The emulator serves one request at a time (http.server.HTTPServer); TensorStore and gcsfs
  # each keep requests in flight from several threads, and serially served they stall each
  # other, so it runs on the standard library's threading server instead.
  launch = ("import http.server, sys; http.server.HTTPServer = http.server.ThreadingHTTPServer; "
            "from gcp_storage_emulator.__main__ import main; sys.exit(main())")
  server = subprocess.Popen(
      [sys.executable, "-c", launch, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
       f"--default-bucket={BUCKET}"],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      if time.time() > deadline or server.poll() is not None:
        server.kill()
        raise RuntimeError(f"gcp-storage-emulator did not start: {server.stdout.read()}") from None
      time.sleep(0.2)
  env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
         "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{port}", "GOOGLE_CLOUD_PROJECT": "test"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield env
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.terminate()
  server.wait(30)


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
