"""The shared training loop (MLLM stages and UPN): sharded jitted steps, Orbax resume, metrics.

A model family plugs in as a `chatrex_jax.train.task.TrainTask` (parameters, stage mask, loss,
data, optional hooks). The trainer derives everything else from it: the mesh and logical rules
of the config, parameter shardings from the logical axis names, the optimizer, the optimizer
state sharded like its parameters, and the jitted step. `Trainer.abstract_state()`,
`Trainer.abstract_batch()` and `Trainer.lower_train_step()` give that step without allocating
anything, so the AOT check (`chatrex_jax.tools.aot`) compiles what `train()` runs.

Gradient accumulation splits the global batch into `grad_accum` micro-batches scanned in
one step; the loss is sum(loss_sum) / sum(denominator) over the whole batch, so accumulation
does not change the result. A non-finite loss or gradient norm stops training with a clear
message before anything is saved: the last good checkpoint stays intact. SIGTERM
(preemption) saves a final checkpoint and exits cleanly. The run's config is saved as
workdir/config.json once its data has opened (`chatrex-jax convert export` reads it), so a
config refused earlier leaves no file behind.
"""
from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from chatrex_jax import storage
from chatrex_jax.configs import ConfigError
from chatrex_jax.errors import atomic_path
from chatrex_jax.train import checkpoint as ckpt_lib
from chatrex_jax.train import metrics as metrics_lib
from chatrex_jax.train import optimizer as opt_lib
from chatrex_jax.train import sharding as sharding_lib
from chatrex_jax.train.task import TrainTask


class TrainingDiverged(RuntimeError):
  pass


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data (checkpointable)


def _microbatches(batch, n: int):
  def split(x):
    if x.shape[0] % n:
      raise ConfigError(f"global batch {x.shape[0]} is not divisible by grad_accum={n}")
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])
  return jax.tree.map(split, batch)


def make_train_step(task, tx, grad_accum: int = 1) -> Callable:
  """(state, batch) -> (state, metrics); pure, for jax.jit."""

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def micro_loss(trainable, micro, key):
      loss_sum, denom, aux = task.loss(opt_lib.merge(trainable, state.frozen), micro, key)
      return loss_sum, (denom, aux)
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    if grad_accum == 1:
      (loss_sum, (denom, aux)), grads = grad_fn(state.trainable, batch, rng)
    else:
      micros = _microbatches(batch, grad_accum)
      zeros = jax.tree.map(jnp.zeros_like, state.trainable)

      def body(carry, xs):
        g_acc, l_acc, d_acc = carry
        micro, i = xs
        (l, (d, aux)), g = grad_fn(state.trainable, micro, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, d_acc + d), aux
      (grads, loss_sum, denom), auxs = jax.lax.scan(
          body, (zeros, jnp.float32(0), jnp.float32(0)), (micros, jnp.arange(grad_accum)))
      aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), auxs)
    denom = jnp.maximum(denom, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax_global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state.opt_state, state.trainable)
    new_trainable = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state.trainable, updates)
    # A non-finite step leaves the state untouched; the host stops on the flag.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(step=state.step + 1, trainable=keep(new_trainable, state.trainable),
                              opt_state=keep(new_opt, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "denominator": denom, **aux}
    return new_state, metrics
  return step_fn


def optax_global_norm(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)) if leaves else jnp.float32(0)


class SelectKeys:
  """Wraps a checkpointable batch iterator, keeping only the keys the train step reads."""

  def __init__(self, it, keys):
    self.it, self.keys = it, tuple(keys)

  def __next__(self):
    batch = next(self.it)
    return {k: batch[k] for k in self.keys}

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


@dataclasses.dataclass
class TrainResult:
  step: int
  history: list[dict]
  stopped_by: str  # "done" | "sigterm" | "max_steps_this_run"


class Trainer:
  """Builds mesh, shardings, state and the jitted step for a task; runs and resumes.

  workdir (checkpoints, metrics) is needed by `train` only: the abstract state and the
  lowered step (AOT compilation) need none.
  """

  def __init__(self, config, task: TrainTask, workdir=None, devices=None):
    self.config = config
    self.task = task
    self.workdir = None if workdir is None else storage.path(workdir)   # local or gs://
    if self.workdir is not None:
      self.workdir.mkdir(parents=True, exist_ok=True)
    mesh_cfg = config.mesh
    self.mesh = sharding_lib.make_mesh(mesh_cfg.get("data", 1), mesh_cfg.get("fsdp", -1),
                                       mesh_cfg.get("tensor", 1), devices=devices)
    self.rules = sharding_lib.config_rules(config)
    self._param_layout = None
    self._sigterm = False

  # -- state ---------------------------------------------------------------------------------

  def param_layout(self):
    """(boxed abstract params, param shardings, trainable mask, trainable shardings, frozen
    shardings); derived once (`task.abstract_params()` traces the model's init)."""
    if self._param_layout is None:
      abstract = self.task.abstract_params()
      param_shardings = nn.unbox(sharding_lib.logical_shardings(abstract, self.mesh, self.rules))
      mask = opt_lib.trainable_mask(nn.unbox(abstract), self.task.trainable_patterns(),
                                    self.task.frozen_patterns())
      tr_sh, fr_sh = opt_lib.partition(param_shardings, mask)
      self._param_layout = (abstract, param_shardings, mask, tr_sh, fr_sh)
    return self._param_layout

  def abstract_state(self) -> TrainState:
    """The state `init_state` creates, as ShapeDtypeStructs carrying their shardings.

    Nothing is allocated (the 7B model costs nothing). Builds the optimizer (`self.tx`,
    `self.schedule`) on the trainable subtree.
    """
    abstract, _, mask, tr_sh, fr_sh = self.param_layout()
    trainable, frozen = opt_lib.partition(nn.unbox(abstract), mask)
    self.tx, self.schedule = opt_lib.make_optimizer(self.config.optim, group_lrs=self.task.group_lrs(),
                                                    params=trainable)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return TrainState(
        step=sharding_lib.with_shardings(jax.ShapeDtypeStruct((), jnp.int32), replicated),
        trainable=sharding_lib.with_shardings(trainable, tr_sh),
        frozen=sharding_lib.with_shardings(frozen, fr_sh),
        opt_state=sharding_lib.with_shardings(jax.eval_shape(self.tx.init, trainable),
                                              self.opt_state_shardings(abstract, mask)),
        rng=sharding_lib.with_shardings(rng, replicated))

  def init_state(self) -> TrainState:
    """The step-0 state with the shardings of `abstract_state`: pretrained or random parameters."""
    shardings = jax.tree.map(lambda x: x.sharding, self.abstract_state())
    _, param_shardings, mask, _, _ = self.param_layout()
    seed = self.config.train.get("seed", 0)
    pretrained = self.task.pretrained_params()
    if pretrained is not None:  # host arrays straight onto their shards
      params = jax.device_put(pretrained, param_shardings)
    else:  # no mesh context: Flax reshapes some boxed kernels inside init
      params = jax.jit(lambda r: nn.unbox(self.task.init_params(r)),
                       out_shardings=param_shardings)(jax.random.key(seed))
    trainable, frozen = opt_lib.partition(params, mask)
    opt_state = jax.jit(self.tx.init, out_shardings=shardings.opt_state)(trainable)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed + 1)), shardings.rng)
    return TrainState(step=jax.device_put(jnp.int32(0), shardings.step), trainable=trainable,
                      frozen=frozen, opt_state=opt_state, rng=rng)

  def opt_state_shardings(self, abstract, mask):
    """Each optimizer leaf sharded like its parameter (the logical boxes survive the
    optimizer's `zeros_like`); left to XLA, Adam's moments come out replicated."""
    boxed_trainable, _ = opt_lib.partition(abstract, mask)
    return nn.unbox(sharding_lib.logical_shardings(jax.eval_shape(self.tx.init, boxed_trainable),
                                                   self.mesh, self.rules))

  # -- step ----------------------------------------------------------------------------------

  def abstract_batch(self) -> dict:
    """The global batch of one step (`task.abstract_batch()`), sharded as `train` puts it."""
    return {k: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                    sharding=sharding_lib.batch_sharding(self.mesh, len(x.shape)))
            for k, x in self.task.abstract_batch().items()}

  def lower_train_step(self, state: TrainState, batch):
    """The jitted step (state donated, shardings kept) lowered for `state` and `batch`,
    arrays or ShapeDtypeStructs with shardings, under the mesh and the logical-axis rules."""
    step_fn = make_train_step(self.task, self.tx, self.config.train.get("grad_accum", 1))
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    jitted = jax.jit(step_fn, in_shardings=(state_sh, None), out_shardings=(state_sh, None),
                     donate_argnums=(0,))
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jitted.lower(state, batch)

  # -- loop ----------------------------------------------------------------------------------

  def _on_sigterm(self, signum, frame):
    self._sigterm = True

  def _global_batch(self, local):
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    n = next(iter(local.values())).shape[0] * jax.process_count()
    if n % shards:
      raise ConfigError(f"global batch {n} is not divisible by the data x fsdp mesh size {shards}: "
                       "change data.batch_size or mesh.data / mesh.fsdp")

    def put(x):
      sharding = sharding_lib.batch_sharding(self.mesh, np.ndim(x))
      return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return jax.tree.map(put, local)

  def train(self, max_steps_this_run: Optional[int] = None, progress: bool = True) -> TrainResult:
    if self.workdir is None:
      raise ValueError("Trainer.train needs a workdir (checkpoints and metrics)")
    cfg = self.config
    tcfg = cfg.train
    total = int(cfg.optim.total_steps)
    state = self.init_state()
    data = self.task.make_data(jax.process_index(), jax.process_count())
    if jax.process_index() == 0:
      with atomic_path(self.workdir / "config.json") as tmp:
        tmp.write_text(cfg.to_json_best_effort(indent=2))
    ckpt = ckpt_lib.Checkpointer(self.workdir / "checkpoints", keep=tcfg.get("keep_checkpoints", 3),
                                 async_save=tcfg.get("async_checkpointing", True))
    start = ckpt.latest_step()
    if start is not None:
      state, data_state = ckpt.restore(start, ckpt_lib.abstract_like(state))
      if data_state and hasattr(data, "set_state"):
        data.set_state(data_state)
      print(f"resumed from step {start} ({self.workdir / 'checkpoints'})", flush=True)
    writer = metrics_lib.MetricWriter(self.workdir)
    previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    history, stopped_by = [], "done"
    step = int(state.step)
    first = step
    flops = peak = step_exe = None
    bar = None
    if progress and jax.process_index() == 0:
      from tqdm import tqdm
      bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True)
    try:
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        while step < total:
          if max_steps_this_run is not None and step - first >= max_steps_this_run:
            stopped_by = "max_steps_this_run"
            break
          local = next(data)
          batch = self._global_batch(local)
          if step_exe is None:  # compiled once: the FLOP count and every step use this executable
            step_exe = self.lower_train_step(state, batch).compile()
            # XLA counts a scanned layer body once: the task's own count is preferred below
            flops = metrics_lib.compiled_flops(step_exe) or float("nan")
            peak = tcfg.get("peak_flops", None) or metrics_lib.peak_flops_per_device()
          task_flops = self.task.model_flops(local)
          if task_flops is not None:
            flops = float(task_flops) * jax.process_count()
          t0 = time.perf_counter()
          state, m = step_exe(state, batch)
          m = jax.device_get(m)
          dt = time.perf_counter() - t0
          step += 1
          if not bool(m["finite"]):
            raise TrainingDiverged(
                f"step {step}: non-finite loss ({float(m['loss'])}) or gradient norm "
                f"({float(m['grad_norm'])}); training stopped, nothing was saved for this step. "
                f"The last good checkpoint is step {ckpt.latest_step()} in {self.workdir / 'checkpoints'}. "
                "Lower the learning rate, check the data, or use fp32 compute.")
          row = {k: float(v) for k, v in m.items() if k != "finite"}
          signature = self.task.batch_signature(local)
          if signature is not None:  # data-order fingerprint, for resume checks
            row["data_signature"] = float(signature)
          row.update(lr=float(self.schedule(step - 1)), step_time_s=dt,
                     tokens_per_s=float(self.task.tokens_in(local)) * jax.process_count() / dt)
          if flops == flops and peak:
            row["mfu"] = flops / dt / (peak * jax.device_count())
          elif flops == flops:
            row["tflops_per_s"] = flops / dt / 1e12
          history.append({"step": step, **row})
          if step % tcfg.get("log_every", 1) == 0 or step == total:
            writer.write(step, row)
          if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
          if step % tcfg.get("checkpoint_every", 100) == 0 or step == total:
            ckpt.save(step, state, data.get_state() if hasattr(data, "get_state") else None)
          if self._sigterm:
            ckpt.save(step, state, data.get_state() if hasattr(data, "get_state") else None, force=True)
            stopped_by = "sigterm"
            break
    finally:
      signal.signal(signal.SIGTERM, previous)
      if bar is not None:
        bar.close()
      ckpt.close()
      writer.close()
    self.state = state
    return TrainResult(step=step, history=history, stopped_by=stopped_by)
