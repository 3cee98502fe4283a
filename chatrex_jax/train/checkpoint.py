"""Orbax checkpoints of the whole training state + the input pipeline's iterator state.

Each step directory holds `state` (step, trainable and frozen parameters, optimizer state, RNG
key data; sharded arrays saved from every host) and `data` (every process's input iterator
state, one JSON file per process: each feeds its own share of the global batch). Saves are
asynchronous; Orbax writes into a temporary directory and renames it on completion, so a kill at
any moment leaves the previous checkpoint intact. `latest_step` only ever sees finished
checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from etils import epath
import jax
import orbax.checkpoint as ocp

from chatrex_jax import storage
from chatrex_jax.errors import UserError


class ProcessStateHandler:
  """Orbax handler of a JSON dict per process (`process_{i}-of-{n}.json`), Grain's layout.

  Orbax's JSON handler writes from the primary process only, which is right for one global
  value but loses the other processes' input positions; every process writes its own file here
  and restores its own. Checkpoints written before this handler (one `metadata` JSON file from
  a single process) still restore.
  """

  def save(self, directory, args: "ProcessStateSave"):
    index, count = jax.process_index(), jax.process_count()
    path = epath.Path(directory) / f"process_{index}-of-{count}.json"
    path.write_text(json.dumps(args.state, indent=1))

  def restore(self, directory, args: "ProcessStateRestore | None" = None) -> dict:
    directory = epath.Path(directory)
    index, count = jax.process_index(), jax.process_count()
    path = directory / f"process_{index}-of-{count}.json"
    if path.exists():
      return json.loads(path.read_text())
    legacy = directory / "metadata"
    if count == 1 and legacy.exists():
      return json.loads(legacy.read_text())
    written = sorted(p.name for p in directory.glob("process_*-of-*.json"))
    raise UserError(
        f"{directory}: no input state for process {index} of {count} (the checkpoint holds "
        f"{written or 'none'}). Resume with the same process count as the run that wrote it "
        "(each process's position in the data is its own)")

  def metadata(self, directory):
    del directory
    return None

  def finalize(self, directory):
    del directory

  def close(self):
    pass

  @classmethod
  def typestr(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(ProcessStateHandler, for_save=True)
@dataclasses.dataclass
class ProcessStateSave(ocp.args.CheckpointArgs):
  state: dict


@ocp.args.register_with_handler(ProcessStateHandler, for_restore=True)
@dataclasses.dataclass
class ProcessStateRestore(ocp.args.CheckpointArgs):
  pass


class Checkpointer:
  def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
    self.directory = storage.path(directory)   # local or gs://
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Optional[dict], *, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state)}
    args["data"] = ProcessStateSave(data_state or {})
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ProcessStateRestore()))
    return out["state"], out["data"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a concrete tree, for restoring onto it."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
