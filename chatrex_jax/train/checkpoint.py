"""Orbax checkpoints of the whole training state + the input pipeline's iterator state.

Each step directory holds `state` (step, trainable and frozen parameters, optimizer state,
RNG key data; sharded arrays saved from every host) and `data` (the Grain iterator state,
JSON). Saves are asynchronous; Orbax writes into a temporary directory and renames it on
completion, so a kill at any moment leaves the previous checkpoint intact. `latest_step`
only ever sees finished checkpoints.
"""
from __future__ import annotations

import pathlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Optional[dict], *, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state)}
    args["data"] = ocp.args.JsonSave(data_state or {})
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a concrete tree, for restoring onto it."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
