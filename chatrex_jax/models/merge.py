"""Merging image and object tokens into the text embeddings, inside `jit`.

The plan (where each position's embedding comes from) is made on the host by
`chatrex_jax.data.merge.merge_plan`; `merge_embeddings` applies it with gathers + `where`,
never a Python loop over tokens.
"""
from __future__ import annotations

import jax.numpy as jnp

from chatrex_jax.protocol.tokens import SOURCE_IMAGE, SOURCE_OBJECT, SOURCE_TEXT


def merge_embeddings(token_embeds, image_embeds, object_embeds, source, source_index):
  """Applies a merge plan inside jit (gathers + where, no loops over tokens).

  token_embeds [B, T, D] (embed_tokens(token_ids)), image_embeds [B, NI, D],
  object_embeds [B, M, D] (M may be 0), source / source_index [B, T] int (from `merge_plan`)
  -> inputs_embeds [B, T, D] in token_embeds' dtype; padding positions are zero.
  """
  src = source[..., None]
  out = jnp.where(src == SOURCE_TEXT, token_embeds, jnp.zeros((), token_embeds.dtype))
  ni = image_embeds.shape[1]
  img = jnp.take_along_axis(image_embeds, jnp.clip(source_index, 0, ni - 1)[..., None], axis=1)
  out = jnp.where(src == SOURCE_IMAGE, img.astype(out.dtype), out)
  m = object_embeds.shape[1]
  if m:
    obj = jnp.take_along_axis(object_embeds, jnp.clip(source_index, 0, m - 1)[..., None], axis=1)
    out = jnp.where(src == SOURCE_OBJECT, obj.astype(out.dtype), out)
  return out
