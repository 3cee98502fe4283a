"""Reading checkpoint files of any family: PyTorch `.pth`/`.pt`/`.bin` through
`torch.load(..., weights_only=True)` only (never a full unpickle), safetensors through this
project's lazy reader (`safetensors_io`).
"""
from __future__ import annotations

import pathlib
from typing import Callable, Iterable, Mapping

import numpy as np

from chatrex_jax.convert.mapping import ConversionError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_state(path) -> Mapping[str, np.ndarray]:
  """The torch-named tensors of a checkpoint: a `.safetensors` file or a HF folder (shards +
  index), read lazily, or a PyTorch file (`read_checkpoint`; entries besides the state dict
  are dropped)."""
  path = pathlib.Path(path)
  if path.suffix in TORCH_SUFFIXES:
    return read_checkpoint(path)[0]
  from chatrex_jax.convert import safetensors_io
  return safetensors_io.Checkpoint(path)


STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")  # where training code puts it


def read_checkpoint(path: str | pathlib.Path, *, safe_globals: Iterable[str] = ()
                    ) -> tuple[dict[str, np.ndarray], list[str]]:
  """An official checkpoint file -> (state dict as numpy, names of the other top-level entries).

  `.pth`/`.pt`: `torch.load(weights_only=True)` only; the state dict is `ckpt["model"]` (the
  official loader's key; "state_dict" / "model_state_dict" also found) or the file's own
  top-level tensors. Entries besides it (optimizer, epoch, ...) are returned by name and
  ignored. A file that pickles objects outside torch's weights-only allowlist (for example the
  training `args` as an argparse.Namespace) is refused with the names of those classes, unless
  the caller lists them in `safe_globals` ("module.Class") after deciding to trust them.
  `.safetensors`: this project's reader.
  """
  path = pathlib.Path(path)
  if path.suffix not in TORCH_SUFFIXES:
    from chatrex_jax.convert import safetensors_io
    return dict(safetensors_io.Checkpoint(path).items()), []
  import importlib
  import pickle

  import torch
  allowed = []
  for name in safe_globals:
    module, _, attr = name.rpartition(".")
    allowed.append(getattr(importlib.import_module(module), attr))
  try:
    with torch.serialization.safe_globals(allowed):
      ckpt = torch.load(str(path), weights_only=True, map_location="cpu")
  except pickle.UnpicklingError as e:
    try:
      unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a torch.save archive at all: the original refusal says so
      unsafe = []
    if not unsafe:
      raise
    raise ConversionError(
        f"checkpoint {path}", other=[
            f"the file pickles objects outside torch's weights-only allowlist: {unsafe}. This "
            "project never unpickles arbitrary objects; if you trust the file, allow exactly "
            "these classes (Python: read_checkpoint(..., safe_globals=[...]); CLI: "
            f"--safe-globals {' '.join(unsafe)}), or save ckpt['model'] alone with "
            f"torch.save / safetensors. ({str(e).splitlines()[0]})"]) from None
  if not isinstance(ckpt, dict):
    raise ValueError(f"{path}: expected a dict (a state dict or {{'model': state dict, ...}}), "
                     f"got {type(ckpt).__name__}")
  key = next((k for k in STATE_DICT_KEYS if isinstance(ckpt.get(k), dict)), None)
  state = ckpt[key] if key else {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
  extras = sorted(str(k) for k in ckpt if k != key and (key or not isinstance(ckpt[k], torch.Tensor)))
  tensors = {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
             for k, v in state.items() if isinstance(v, torch.Tensor)}
  return tensors, extras


def load_state_dict(path: str | pathlib.Path, **kw) -> dict[str, np.ndarray]:
  """The state dict of an official checkpoint file (`read_checkpoint` without the extras)."""
  return read_checkpoint(path, **kw)[0]


def convert_file(path, to_flax: Callable[[Mapping[str, np.ndarray]], dict]) -> dict:
  """`to_flax(read_state(path))`, the lazy reader closed afterwards (a family's `load`)."""
  state = read_state(path)
  try:
    return to_flax(state)
  finally:
    if hasattr(state, "close"):
      state.close()


def write_safetensors(state: Mapping[str, np.ndarray], path) -> pathlib.Path:
  """Torch-named tensors -> one `.safetensors` file (a family's `save`)."""
  from chatrex_jax.convert import safetensors_io
  path = pathlib.Path(path)
  if path.suffix != ".safetensors":
    raise ValueError(f"{path}: name the file *.safetensors")
  path.parent.mkdir(parents=True, exist_ok=True)
  safetensors_io.save_file(dict(state), path)
  return path
