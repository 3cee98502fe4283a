"""Config sections every training config shares: optimizer, trainer, mesh, sharding rules.

Each builder returns the full section with the project's defaults; a config passes only what
it changes (`optim(lr=1e-4, clip_norm=0.1)`), so a new trainer field is added here once.
"""
from __future__ import annotations

import ml_collections

from chatrex_jax.train.sharding import FSDP_RULES


def optim(**changes) -> ml_collections.ConfigDict:
  """AdamW with linear warmup and cosine decay to end_lr_ratio * lr, global-norm clipping."""
  c = ml_collections.ConfigDict(dict(
      lr=1e-4, total_steps=1000, warmup_steps=100, end_lr_ratio=0.0, weight_decay=0.0,
      b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0))
  c.update(changes)
  return c


def train(**changes) -> ml_collections.ConfigDict:
  """The shared trainer's loop settings (`chatrex_jax.train.trainer`)."""
  c = ml_collections.ConfigDict(dict(
      seed=0, grad_accum=1, log_every=10, checkpoint_every=500, keep_checkpoints=3,
      async_checkpointing=True, peak_flops=ml_collections.config_dict.placeholder(float)))
  c.update(changes)
  return c


def mesh(data: int = 1, fsdp: int = -1, tensor: int = 1) -> ml_collections.ConfigDict:
  """Device mesh axes (-1: every device left)."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def logical_rules() -> list[list[str]]:
  """Logical-axis -> mesh-axis rules (FSDP over `fsdp`, heads/MLP over `tensor`)."""
  return [list(r) for r in FSDP_RULES]
