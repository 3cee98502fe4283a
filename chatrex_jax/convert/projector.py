"""`mlp2x_gelu` projectors (torch `nn.Sequential(Linear, GELU, Linear)`) <-> `MLP2xGELU`.

Torch keys `{prefix}0.{weight,bias}` and `{prefix}2.{weight,bias}`; in the ChatRex/RexSeek
MLLM the prefixes are `mm_projector.` and `mm_object_projector.` (top level).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from chatrex_jax.convert import mapping
from chatrex_jax.convert.mapping import Rule

PREFIX_IMAGE = "mm_projector."
PREFIX_OBJECT = "mm_object_projector."


def rules(prefix: str = PREFIX_IMAGE, flax_prefix: str = "") -> list[Rule]:
  fp = mapping.flax_scope(flax_prefix)
  return mapping.linear_rules(f"{prefix}0", f"{fp}fc1") + mapping.linear_rules(f"{prefix}2", f"{fp}fc2")


def to_flax(state: Mapping[str, np.ndarray], *, prefix: str = PREFIX_IMAGE, expected=None,
            strict: bool = True, dtype=None) -> dict:
  return mapping.to_flax(state, rules(prefix), what=f"projector ({prefix})", expected=expected,
                         strict=strict, dtype=dtype)


def to_torch(params: Mapping, *, prefix: str = PREFIX_IMAGE, dtype=None) -> dict[str, np.ndarray]:
  return dict(mapping.to_torch(params, rules(prefix), what="projector", dtype=dtype))
