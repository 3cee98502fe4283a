"""Optimizer, learning-rate schedule and trainable/frozen partitions (stage masks).

Frozen parameters live in a separate subtree of the train state: the loss is differentiated
only with respect to the trainable subtree (XLA computes no weight gradient for the rest),
and the optimizer is built on the trainable subtree alone, so frozen weights carry no
optimizer state at all (docs/architecture.md B.11 stage 1: only the projectors and embeddings train).
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Mapping, Sequence

import optax

from chatrex_jax.convert.mapping import flatten, unflatten

# Stage masks for the MLLM: glob patterns over '/'-joined parameter paths.
STAGE_PATTERNS: dict[str, tuple[str, ...]] = {
    # Alignment: both projectors and the whole input/output embedding matrices.
    "stage1": ("mm_projector/*", "mm_object_projector/*", "llm/embed_tokens/*", "llm/lm_head/*"),
    "stage2": ("*",),
    "stage3": ("*",),
}


def trainable_mask(params: Mapping, patterns: Sequence[str], exclude: Sequence[str] = ()) -> dict:
  """Nested bool tree: True where the path matches a pattern and no exclusion."""
  flat = flatten(params)
  return unflatten({p: any(fnmatch.fnmatchcase(p, pat) for pat in patterns)
                    and not any(fnmatch.fnmatchcase(p, ex) for ex in exclude) for p in flat})


def partition(params: Mapping, mask: Mapping) -> tuple[dict, dict]:
  """(trainable, frozen) subtrees holding only their leaves."""
  flat, flat_mask = flatten(params), flatten(mask)
  trainable = {p: v for p, v in flat.items() if flat_mask[p]}
  frozen = {p: v for p, v in flat.items() if not flat_mask[p]}
  return unflatten(trainable), unflatten(frozen)


def merge(trainable: Mapping, frozen: Mapping) -> dict:
  out = flatten(frozen)
  overlap = set(out) & set(flatten(trainable))
  if overlap:
    raise ValueError(f"parameters both trainable and frozen: {sorted(overlap)[:5]}")
  out.update(flatten(trainable))
  return unflatten(out)


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int,
                  end_ratio: float = 0.0) -> Callable:
  """Linear warm-up from 0 to peak, then cosine decay to peak * end_ratio."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=max(warmup_steps, 0),
      decay_steps=max(total_steps, warmup_steps + 1), end_value=peak_lr * end_ratio)


def make_optimizer(cfg, lr_schedule: Callable | None = None,
                   group_lrs: Mapping[str, float] | None = None,
                   params: Mapping | None = None) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW + warm-up-cosine + global-norm clipping (config: `optim` section).

  group_lrs: optional {glob pattern: peak lr} for parameter groups with their own rate (UPN's
  backbone trains at 1e-5); needs `params` (the trainable tree) to label leaves.
  Returns (transformation, schedule of the main group).
  """
  schedule = lr_schedule or warmup_cosine(cfg.lr, cfg.total_steps, cfg.warmup_steps,
                                          cfg.get("end_lr_ratio", 0.0))

  def adamw(sched):
    return optax.adamw(sched, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8),
                       weight_decay=cfg.get("weight_decay", 0.0))
  if group_lrs:
    if params is None:
      raise ValueError("group_lrs needs the trainable params to label")
    flat = flatten(params)
    labels = {p: next((pat for pat in group_lrs if fnmatch.fnmatchcase(p, pat)), "default") for p in flat}
    txs = {"default": adamw(schedule)}
    for pat, lr in group_lrs.items():
      txs[pat] = adamw(warmup_cosine(lr, cfg.total_steps, cfg.warmup_steps, cfg.get("end_lr_ratio", 0.0)))
    inner = optax.multi_transform(txs, unflatten(labels))
  else:
    inner = adamw(schedule)
  tx = optax.chain(optax.clip_by_global_norm(cfg.get("clip_norm", 1.0)), inner) \
      if cfg.get("clip_norm", 1.0) else inner
  return tx, schedule
