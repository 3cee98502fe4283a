"""ChatRex's vocabulary extension on a Flax LLM tree (docs/architecture.md B.7).

Adding `<obj0>`..`<obj99>` and the grounding markers changes the model's parameters (the
embedding and, when untied, the LM head grow by 104 rows), not a checkpoint format, so it
lives with the models; the converters only move tensors between layouts.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from chatrex_jax.models.llm import LLMConfig

NEW_TOKEN_INITS = ("mean", "sampled")


def resize_vocab(params: Mapping, config: LLMConfig, new_vocab_size: int,
                 num_new_tokens: int, *, init: str = "mean", seed: int = 0) -> tuple[dict, LLMConfig]:
  """ChatRex's vocabulary extension (docs/architecture.md B.7), on a Flax tree.

  Mirrors `resize_token_embeddings(len(tokenizer))` followed by setting the last
  `num_new_tokens` input and output rows (each matrix separately) to
    "mean": the mean of the rows before them, as the official code does; every new token
      starts identical and only training tells them apart;
    "sampled": draws from N(mean, covariance) of those rows, so each new token starts as
      distinct as two ordinary vocabulary tokens (a pretrained LLM can copy them at once).
  The matrix may shrink (Qwen pads its embedding beyond the tokenizer).
  """
  import dataclasses

  from flax.core import meta
  params = meta.unbox(params)
  if not 0 < num_new_tokens <= new_vocab_size:
    raise ValueError(f"num_new_tokens={num_new_tokens} must be in (0, new_vocab_size={new_vocab_size}]")
  if init not in NEW_TOKEN_INITS:
    raise ValueError(f"new-token init {init!r} is not one of {NEW_TOKEN_INITS}")
  rng = np.random.default_rng(seed)

  def resize(matrix: np.ndarray, axis: int) -> np.ndarray:
    m = np.moveaxis(np.asarray(matrix), axis, 0)
    old = m.shape[0]
    out = np.zeros((new_vocab_size,) + m.shape[1:], m.dtype)
    keep = min(old, new_vocab_size)
    out[:keep] = m[:keep]
    base = new_vocab_size - num_new_tokens
    rows = out[:base].astype(np.float64)
    mean = rows.mean(axis=0)
    if init == "mean":
      out[base:] = mean.astype(m.dtype)
    else:
      centred = rows - mean
      cov = centred.T @ centred / max(base - 1, 1)
      out[base:] = rng.multivariate_normal(mean, cov, size=num_new_tokens, method="eigh").astype(m.dtype)
    return np.moveaxis(out, 0, axis)

  params = _copy_tree(params)
  params["embed_tokens"]["embedding"] = resize(params["embed_tokens"]["embedding"], 0)
  if not config.tie_word_embeddings:
    vocab_axis = 0 if config.kernel_out_first else 1
    params["lm_head"]["kernel"] = resize(params["lm_head"]["kernel"], vocab_axis)
  return params, dataclasses.replace(config, vocab_size=new_vocab_size)


def _copy_tree(tree):
  return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def add_chatrex_tokens(params: Mapping, config: LLMConfig, tokenizer, *, init: str = "mean",
                       seed: int = 0) -> tuple[dict, LLMConfig]:
  """Adds ChatRex's 104 tokens (`<obj0>`..`<obj99>`, `<ground>`, `</ground>`, `<objects>`,
  `</objects>`, special, in that order) to a locally loaded HF tokenizer and resizes the
  embeddings to `len(tokenizer)`, the new rows initialised by `init` (`resize_vocab`; "mean",
  the official rule, by default). Tokens the tokenizer already has are not added twice."""
  from chatrex_jax.protocol.tokens import SPECIAL_TOKENS
  missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
  if len(missing) not in (0, len(SPECIAL_TOKENS)):
    raise ValueError(f"tokenizer has {len(SPECIAL_TOKENS) - len(missing)} of the ChatRex tokens: "
                     "add all of them or none (the order fixes their ids)")
  added = tokenizer.add_tokens(list(missing), special_tokens=True) if missing else 0
  if not added:
    return dict(params), config
  return resize_vocab(params, config, len(tokenizer), added, init=init, seed=seed)
