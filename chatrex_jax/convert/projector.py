"""`mlp2x_gelu` projectors (torch `nn.Sequential(Linear, GELU, Linear)`) <-> `MLP2xGELU`.

Torch keys `{prefix}0.{weight,bias}` and `{prefix}2.{weight,bias}`; in the ChatRex/RexSeek
MLLM the prefixes are `mm_projector.` and `mm_object_projector.` (top level).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from chatrex_jax.convert import mapping
from chatrex_jax.convert.mapping import LINEAR, Rule

PREFIX_IMAGE = "mm_projector."
PREFIX_OBJECT = "mm_object_projector."


def rules(prefix: str = PREFIX_IMAGE, flax_prefix: str = "") -> list[Rule]:
  fp = flax_prefix.rstrip("/") + "/" if flax_prefix else ""
  return [Rule(f"{prefix}0.weight", f"{fp}fc1/kernel", LINEAR), Rule(f"{prefix}0.bias", f"{fp}fc1/bias"),
          Rule(f"{prefix}2.weight", f"{fp}fc2/kernel", LINEAR), Rule(f"{prefix}2.bias", f"{fp}fc2/bias")]


def to_flax(state: Mapping[str, np.ndarray], *, prefix: str = PREFIX_IMAGE, expected=None,
            strict: bool = True, dtype=None) -> dict:
  return mapping.to_flax(state, rules(prefix), what=f"projector ({prefix})", expected=expected,
                         strict=strict, dtype=dtype)


def to_torch(params: Mapping, *, prefix: str = PREFIX_IMAGE, dtype=None) -> dict[str, np.ndarray]:
  return dict(mapping.to_torch(params, rules(prefix), what="projector", dtype=dtype))
