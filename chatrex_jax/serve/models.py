"""The models `chatrex-jax serve` answers with, found once at start-up.

Sources, in order: `--checkpoint DIR` (a ChatRex folder in the official layout: a released
model converted with `chatrex-jax convert chatrex`, a training export, a demo stage export) and
`--upn FILE` (an official UPN `.pth`/`.safetensors`, or this project's Flax-keyed file); for
what is not given, the models `chatrex-jax demo` trained in `--workdir` (default
./chatrex_demo): its UPN trainer checkpoint and its stage-3 ChatRex export. What is missing is
not an error at start-up: the page says which command makes it (`Models.problems`).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from chatrex_jax.errors import UserError

DEMO_COMMAND = "chatrex-jax demo --workdir {workdir}"


@dataclasses.dataclass
class Models:
  """The loaded models (None where none was found) and where they came from."""
  upn: Any = None                # inference.upn.UPNPredictor
  chatrex: Any = None            # inference.pipeline.ChatRexPipeline
  upn_source: str = ""
  chatrex_source: str = ""
  problems: list[str] = dataclasses.field(default_factory=list)

  def describe(self) -> str:
    lines = [f"UPN: {self.upn_source or 'none'}", f"ChatRex: {self.chatrex_source or 'none'}"]
    return "\n".join(lines + [f"missing: {p}" for p in self.problems])


def _demo_upn(workdir: pathlib.Path, pad_multiple: int):
  """The UPN a demo run trained (its Trainer workdir `upn/`), at the demo's input size."""
  import ml_collections

  from chatrex_jax.inference.upn import UPNPredictor
  from chatrex_jax.inference.upn_export import load_trained_params
  from chatrex_jax.train.upn_task import model_config
  run = workdir / "upn"
  config = ml_collections.ConfigDict(json.loads((run / "config.json").read_text()))
  params = load_trained_params(run)
  size = int(config.data.max_size)
  return UPNPredictor(params, model_config(config.model), size=size, max_size=size,
                      pad_multiple=pad_multiple)


def load_models(*, workdir: str = "chatrex_demo", checkpoint: str | None = None,
                upn: str | None = None, upn_config: str = "large", pad_multiple: int = 64,
                seq_bucket: int = 64) -> Models:
  """Loads what the options name, else what a demo run left in `workdir`."""
  from chatrex_jax.inference.pipeline import ChatRexPipeline
  from chatrex_jax.inference.predict import check_checkpoint
  from chatrex_jax.inference.upn import UPNPredictor
  models = Models()
  root = pathlib.Path(workdir)
  demo = DEMO_COMMAND.format(workdir=workdir)
  if upn:
    from chatrex_jax.inference.upn_predict import load_config
    path = pathlib.Path(upn)
    if not path.is_file():
      raise UserError(f"--upn {upn}: {'not a file' if path.exists() else 'does not exist'}; give a "
                      "UPN checkpoint (.pth or .safetensors, e.g. upn_large.pth)")
    models.upn = UPNPredictor.from_checkpoint(path, load_config(upn_config), pad_multiple=pad_multiple)
    models.upn_source = f"{path} ({upn_config})"
  elif (root / "upn" / "checkpoints").is_dir():
    models.upn = _demo_upn(root, pad_multiple)
    models.upn_source = f"{root / 'upn'} (trained by chatrex-jax demo)"
  else:
    models.problems.append(f"no UPN model: run `{demo}` (it trains one), or pass --upn upn_large.pth")
  if checkpoint:
    check_checkpoint(checkpoint)
    folder = pathlib.Path(checkpoint)
  else:
    folder = root / "chatrex" / "stage3" / "export"
  if (folder / "config.json").is_file():
    models.chatrex = ChatRexPipeline.from_checkpoint(folder, seq_bucket=seq_bucket)
    models.chatrex_source = str(folder) + ("" if checkpoint else " (trained by chatrex-jax demo)")
  else:
    models.problems.append(f"no ChatRex model: run `{demo}` (it trains one), or pass --checkpoint "
                           "DIR (a folder from `chatrex-jax convert chatrex` or a training export)")
  return models
