"""`mlp2x_gelu` projectors (torch `nn.Sequential(Linear, GELU, Linear)`) <-> `MLP2xGELU`.

Torch keys `{prefix}0.{weight,bias}` and `{prefix}2.{weight,bias}`; in the ChatRex/RexSeek
MLLM the prefixes are `mm_projector.` and `mm_object_projector.` (top level).
"""
from __future__ import annotations

import pathlib
from typing import Mapping

import numpy as np

from chatrex_jax.convert import mapping, torch_files
from chatrex_jax.convert.mapping import Rule

PREFIX_IMAGE = "mm_projector."
PREFIX_OBJECT = "mm_object_projector."


def rules(prefix: str = PREFIX_IMAGE, flax_prefix: str = "") -> list[Rule]:
  fp = mapping.flax_scope(flax_prefix)
  return mapping.linear_rules(f"{prefix}0", f"{fp}fc1") + mapping.linear_rules(f"{prefix}2", f"{fp}fc2")


def abstract_params(in_features: int, features: int) -> dict:
  """The parameter shapes of `MLP2xGELU(features)` on `in_features` inputs."""
  import jax
  return {"fc1": {"kernel": jax.ShapeDtypeStruct((in_features, features), np.float32),
                  "bias": jax.ShapeDtypeStruct((features,), np.float32)},
          "fc2": {"kernel": jax.ShapeDtypeStruct((features, features), np.float32),
                  "bias": jax.ShapeDtypeStruct((features,), np.float32)}}


def to_flax(state: Mapping[str, np.ndarray], *, prefix: str = PREFIX_IMAGE, expected=None,
            check_shapes: bool = True, strict: bool = True, dtype=None) -> dict:
  """torch `nn.Sequential(Linear, GELU, Linear)` tensors -> Flax params. A projector has no
  config, so by default its sizes are read from the first Linear (`{prefix}0.weight`, [out, in])
  and every other tensor is checked against them (`expected` gives them instead)."""
  if expected is None and check_shapes:
    first = state.get(f"{prefix}0.weight")
    if first is not None and np.ndim(first) == 2:
      out_features, in_features = np.shape(first)
      expected = abstract_params(in_features, out_features)
  return mapping.to_flax(state, rules(prefix), what=f"projector ({prefix})", expected=expected,
                         strict=strict, dtype=dtype)


def to_torch(params: Mapping, *, prefix: str = PREFIX_IMAGE, dtype=None) -> dict[str, np.ndarray]:
  return dict(mapping.to_torch(params, rules(prefix), what="projector", dtype=dtype))


def load(path, **kw) -> dict:
  """A checkpoint file or folder (`torch_files.read_state`) -> Flax params (`to_flax`'s options)."""
  return torch_files.convert_file(path, lambda state: to_flax(state, **kw))


def save(params: Mapping, path, **kw) -> pathlib.Path:
  """Flax params -> one safetensors file with the torch names (`to_torch`'s options)."""
  return torch_files.write_safetensors(to_torch(params, **kw), path)
