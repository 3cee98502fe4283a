"""The MLLM trainer on real engine shards: overfitting, stage masks, sharded = single-device
steps, exact resume after kill -9, and the non-finite stop."""
import os
import pathlib
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from chatrex_jax.configs import load_config
from chatrex_jax.convert.mapping import flatten
from chatrex_jax.train import checkpoint as ckpt_lib
from chatrex_jax.train.metrics import read_jsonl
from chatrex_jax.train.mllm_task import ChatRexTask
from chatrex_jax.train.trainer import Trainer, TrainingDiverged
from tests.builders import train_cmd, write_train_assets
from tests.builders import train_overrides as overrides

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return write_train_assets(tmp_path_factory.mktemp("train"))


def config(assets, stage="stage2", **extra):
  return load_config(f"chatrex_tiny:{stage}", overrides(assets, **extra))


class FixedBatchTask(ChatRexTask):
  """Always the same batch: the model must be able to memorise it."""

  def make_data(self, process_index, process_count):
    it = super().make_data(process_index, process_count)
    batch = next(it)

    class Repeat:
      def __next__(self):
        return batch
    return Repeat()


def test_tiny_model_overfits_a_batch(assets, tmp_path):
  cfg = config(assets, **{"optim.total_steps": 80, "optim.lr": 5e-3, "optim.warmup_steps": 3,
                          "train.checkpoint_every": 1000})
  result = Trainer(cfg, FixedBatchTask(cfg), tmp_path).train(progress=False)
  losses = [h["loss"] for h in result.history]
  assert losses[-1] <= 0.1 * losses[0], (losses[0], losses[-1])
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  assert len(rows) == 80 and {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= set(rows[0])
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_abstract_batch_is_what_the_data_yields(assets):
  """The batch AOT compiles for (`TrainTask.abstract_batch`) is the pipeline's, key by key."""
  cfg = config(assets)
  task = ChatRexTask(cfg)
  batch = next(task.make_data(process_index=0, process_count=1))
  assert {k: (x.shape, np.dtype(x.dtype)) for k, x in task.abstract_batch().items()} == \
      {k: (v.shape, v.dtype) for k, v in batch.items()}


def test_stage1_freezes_everything_but_projectors_and_embeddings(assets, tmp_path):
  cfg = config(assets, "stage1", **{"optim.total_steps": 2})
  trainer = Trainer(cfg, ChatRexTask(cfg), tmp_path)
  initial = trainer.init_state()
  frozen0 = jax.tree.map(np.asarray, initial.frozen)
  trainable0 = jax.tree.map(np.asarray, initial.trainable)
  trainer.train(progress=False)
  state = trainer.state
  assert set(flatten(state.trainable)) == {p for p in flatten(trainable0)}
  assert all(p.split("/")[0] in ("mm_projector", "mm_object_projector") or
             p.startswith(("llm/embed_tokens/", "llm/lm_head/")) for p in flatten(trainable0))
  for path, value in flatten(state.frozen).items():  # bit-identical
    assert np.array_equal(np.asarray(value), frozen0[path.split("/")[0]] if False else flatten(frozen0)[path]), path
  assert any(not np.array_equal(np.asarray(v), flatten(trainable0)[p]) for p, v in flatten(state.trainable).items())
  # Optimizer state exists for the trainable leaves only (Adam: two moments each).
  n_trainable = sum(np.size(v) for v in flatten(trainable0).values())
  n_frozen = sum(np.size(v) for v in flatten(frozen0).values())
  n_opt = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
  assert n_frozen > n_trainable and n_opt <= 2 * n_trainable + 16


MESHES = {"single": {"data": 1, "fsdp": 1, "tensor": 1}, "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
          "d2f2t2": {"data": 2, "fsdp": 2, "tensor": 2}}


@pytest.mark.parametrize("mesh", ["d2f2t2", pytest.param("fsdp8", marks=pytest.mark.slow)])
def test_sharded_step_equals_single_device(assets, tmp_path, n_devices, mesh):
  """Two steps on 8 devices (every mesh axis at once by default; pure FSDP under `slow`) equal
  the same two steps on one device: losses and updated parameters."""
  results = {}
  for name, devices in (("single", jax.devices()[:1]), (mesh, None)):
    cfg = config(assets, **{"optim.total_steps": 2, "train.checkpoint_every": 1000})
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = (MESHES[name][a] for a in ("data", "fsdp", "tensor"))
    trainer = Trainer(cfg, ChatRexTask(cfg), tmp_path / name, devices=devices)
    with jax.default_matmul_precision("highest"):
      res = trainer.train(progress=False)
    results[name] = (res.history, flatten(jax.tree.map(np.asarray, trainer.state.trainable)))
  (ref_hist, ref_params), (hist, params) = results["single"], results[mesh]
  np.testing.assert_allclose([h["loss"] for h in hist], [h["loss"] for h in ref_hist], rtol=1e-5)
  for p in ref_params:
    np.testing.assert_allclose(params[p], ref_params[p], atol=1e-5, rtol=1e-4, err_msg=f"{mesh} {p}")


def _train_cmd(assets, workdir, **extra):
  return train_cmd(assets, workdir, **extra)


def test_kill9_then_resume_reproduces_losses_and_data_order(assets, tmp_path):
  """SIGKILL after step 7, restart: the steps after the restored checkpoint run a second time
  with the same loss and the same batch, and the run finishes."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  extra = {"optim.total_steps": 10, "train.checkpoint_every": 3}
  work = tmp_path / "killed"
  proc = subprocess.Popen(_train_cmd(assets, work, **extra), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  deadline = time.time() + 600
  # Orbax's save of step 6 first waits for step 3's to finish: at step 7 one is on disk.
  while time.time() < deadline and len(read_jsonl(work / "metrics.jsonl")) < 7 and proc.poll() is None:
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  first = read_jsonl(work / "metrics.jsonl")
  assert 7 <= len(first) < 10, len(first)
  out = subprocess.run(_train_cmd(assets, work, **extra), check=True, env=env, capture_output=True, text=True)
  restored = int(re.search(r"resumed from step (\d+)", out.stdout).group(1))
  assert restored in (3, 6)
  rows = read_jsonl(work / "metrics.jsonl")
  assert [r["step"] for r in rows] == [r["step"] for r in first] + list(range(restored + 1, 11))
  before = {r["step"]: r for r in first}
  twice = [(r, before[r["step"]]) for r in rows[len(first):] if r["step"] in before]
  assert twice
  for again, once in twice:
    assert again["loss"] == once["loss"], again["step"]
    assert again["data_signature"] == once["data_signature"], again["step"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(assets, tmp_path):
  cfg = config(assets, **{"optim.total_steps": 6, "optim.lr": 1e30, "optim.warmup_steps": 0,
                          "optim.clip_norm": 0.0, "train.checkpoint_every": 1, "train.async_checkpointing": False})
  trainer = Trainer(cfg, ChatRexTask(cfg), tmp_path)
  with pytest.raises(TrainingDiverged, match="last good checkpoint is step"):
    trainer.train(progress=False)
  ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  last = ckpt.latest_step()
  assert last is not None and last >= 1
  state, _ = ckpt.restore(last, ckpt_lib.abstract_like(trainer.init_state()))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.trainable))
  ckpt.close()


def test_sigterm_saves_a_final_checkpoint_and_exits_cleanly(assets, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  work = tmp_path / "preempted"
  proc = subprocess.Popen(_train_cmd(assets, work, **{"optim.total_steps": 1000, "train.checkpoint_every": 1000}),
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 600
  while time.time() < deadline and len(read_jsonl(work / "metrics.jsonl")) < 2 and proc.poll() is None:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-2000:]
  assert "(sigterm)" in out
  steps = len(read_jsonl(work / "metrics.jsonl"))
  ckpt = ckpt_lib.Checkpointer(work / "checkpoints")
  assert ckpt.latest_step() == steps  # the step it stopped at, not a periodic one
  ckpt.close()
