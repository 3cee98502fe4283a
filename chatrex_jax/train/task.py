"""`TrainTask`: what a model family gives the shared trainer (and the AOT check).

Implementations: `mllm_task.ChatRexTask` (the three MLLM stages), `upn_task.UPNTask`, and the
demo's `TinyLLMTask`. They subclass `TrainTask` explicitly, so the optional hooks below have
their defaults and `Trainer` calls every member without probing for it.

Batches: `make_data` yields per-host numpy dicts (the process's share of the global batch);
`abstract_batch` describes the GLOBAL batch of one step with the same keys, shapes (but the
global batch size) and dtypes, so `Trainer.abstract_batch` and `chatrex_jax.tools.aot` compile
exactly the program `Trainer.train` runs.
"""
from __future__ import annotations

import abc
from typing import Any, Iterator, Mapping, Optional, Protocol, Sequence

import jax
import numpy as np

Batch = Mapping[str, Any]


def token_signature(token_ids) -> float:
  """`batch_signature` of a token batch: a position-weighted sum of the ids, mod a prime (the
  same tokens in another order give another value)."""
  ids = np.asarray(token_ids, np.int64)
  return float(np.sum(ids * np.arange(1, ids.size + 1).reshape(ids.shape)) % 1_000_003)


class TrainTask(Protocol):
  """Model, stage mask, loss and data of one training job."""

  # -- parameters ------------------------------------------------------------------------------

  @abc.abstractmethod
  def abstract_params(self) -> Any:
    """Boxed abstract parameters, `jax.eval_shape(model.init, ...)["params"]`: shapes, dtypes
    and the logical axis names the shardings come from."""

  @abc.abstractmethod
  def init_params(self, rng: jax.Array) -> Any:
    """Random parameters (boxed or not); jitted by the trainer with the sharded out_shardings."""

  def pretrained_params(self) -> Optional[Any]:
    """Host parameters to start from (e.g. `model.init_from`), or None for `init_params`."""
    return None

  @abc.abstractmethod
  def trainable_patterns(self) -> Sequence[str]:
    """Glob patterns over 'a/b/c' parameter paths of what trains (the stage mask)."""

  def frozen_patterns(self) -> Sequence[str]:
    """Glob patterns excluded from `trainable_patterns` (frozen towers)."""
    return ()

  def group_lrs(self) -> Optional[Mapping[str, float]]:
    """{pattern: peak lr} of parameter groups with their own rate (UPN's backbone), or None."""
    return None

  # -- step ------------------------------------------------------------------------------------

  @abc.abstractmethod
  def loss(self, params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
    """(loss_sum, denominator, metrics), fp32 scalars; the step's loss is
    sum(loss_sum) / sum(denominator) over micro-batches (gradient accumulation)."""

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of one step as shapes: the keys `make_data` yields, leading axis
    `config.data.batch_size` (needed to compile the step ahead of time)."""
    raise NotImplementedError(f"{type(self).__name__} does not describe its batch: it cannot be "
                              "compiled ahead of time")

  # -- data and metrics ------------------------------------------------------------------------

  @abc.abstractmethod
  def make_data(self, process_index: int, process_count: int) -> Iterator[Batch]:
    """Iterator of per-host numpy batches; `get_state()` / `set_state()` make it resumable."""

  @abc.abstractmethod
  def tokens_in(self, local_batch: Batch) -> float:
    """Tokens (or images) of a per-host batch, for the throughput metric."""

  def batch_signature(self, local_batch: Batch) -> Optional[float]:
    """A fingerprint of the batch's content (logged as data_signature: resume checks), or None."""
    return None

  def model_flops(self, local_batch: Batch) -> Optional[float]:
    """Analytic training FLOPs of a per-host batch (MFU), or None for XLA's cost analysis,
    which counts a scanned layer body only once."""
    return None
