"""Jitted autoregressive generation with a KV cache: prefill + `lax.while_loop` decode.

Works from token ids or from `inputs_embeds` (the MLLM feeds merged image/object/text
embeddings). Batches may be left- or right-padded: rows are left-aligned once on device
(a stable argsort of the mask), RoPE positions are `cumsum(mask) - 1` as in HF `generate`,
and every row then appends its new token at the same cache slot, so the loop is a single
fixed-shape step. Greedy (temperature 0), temperature and top-p sampling; rows stop on any
of `eos_ids` and are filled with `pad_id` afterwards; the loop ends when all rows stopped.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from chatrex_jax.models.llm import CausalLM, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 32
  temperature: float = 0.0  # 0 = greedy
  top_p: float = 1.0
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  return_logits: bool = False  # also return the raw logits of every step [N, B, V]

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


@dataclasses.dataclass
class GenerationOutput:
  tokens: np.ndarray  # [B, N] int32, pad_id after a row's EOS
  lengths: np.ndarray  # [B] number of generated tokens including the EOS
  step_logits: Optional[np.ndarray] = None  # [N, B, V] float32 if requested


def select_token(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """logits [B, V] fp32 -> token ids [B] (greedy when temperature == 0)."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # HF TopPLogitsWarper: drop tokens once the mass *before* them exceeds top_p (keep >= 1).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def left_align(embeds: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Moves each row's real tokens to the end: [B, T, D], [B, T] -> left-padded versions."""
  order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)
  return jnp.take_along_axis(embeds, order[:, :, None], axis=1), jnp.take_along_axis(mask, order, axis=1)


@functools.partial(jax.jit, static_argnames=("model", "sampling"))
def _generate(model: CausalLM, params, embeds, mask, rng, sampling: SamplingConfig):
  b, t, _ = embeds.shape
  n = sampling.max_new_tokens
  mask = mask.astype(bool)
  embeds, mask = left_align(embeds, mask)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  lengths = mask.sum(axis=1)
  cache = init_cache(model.config, b, t + n)
  key_valid = jnp.concatenate([mask, jnp.zeros((b, n), bool)], axis=1)
  variables = {"params": params}
  out = model.apply(variables, inputs_embeds=embeds, positions=positions, key_valid=key_valid,
                    cache=cache, cache_index=0, compute_logits=False)   # static 0: the prefill path
  logits = model.apply(variables, out["hidden"][:, -1:], method=CausalLM.logits_from_hidden)[:, 0]
  eos = jnp.asarray(sampling.eos_ids or (-1,), jnp.int32)
  v = logits.shape[-1]
  state = dict(
      step=jnp.int32(0), logits=logits.astype(jnp.float32), cache=out["cache"], key_valid=key_valid,
      tokens=jnp.full((b, n), sampling.pad_id, jnp.int32), done=jnp.zeros((b,), bool),
      num=jnp.zeros((b,), jnp.int32), rng=rng,
      step_logits=jnp.zeros((n if sampling.return_logits else 0, b, v), jnp.float32))

  def cond(s):
    return (s["step"] < n) & ~jnp.all(s["done"])

  def body(s):
    rng, sub = jax.random.split(s["rng"])
    step = s["step"]
    token = select_token(s["logits"], sub, sampling.temperature, sampling.top_p)
    token = jnp.where(s["done"], sampling.pad_id, token)
    num = s["num"] + (~s["done"]).astype(jnp.int32)
    done = s["done"] | jnp.isin(token, eos)
    step_logits = s["step_logits"]
    if sampling.return_logits:
      step_logits = step_logits.at[step].set(s["logits"])
    slot = t + step
    key_valid = s["key_valid"].at[:, slot].set(True)
    x = model.apply(variables, token[:, None], method=CausalLM.embed)
    out = model.apply(variables, inputs_embeds=x, positions=(lengths + step)[:, None],
                      key_valid=key_valid, cache=s["cache"], cache_index=slot)
    return dict(step=step + 1, logits=out["logits"][:, 0], cache=out["cache"], key_valid=key_valid,
                tokens=s["tokens"].at[:, step].set(token), done=done, num=num, rng=rng,
                step_logits=step_logits)

  state = jax.lax.while_loop(cond, body, state)
  return state["tokens"], state["num"], state["step_logits"]


def generate(model: CausalLM, params, *, input_ids=None, inputs_embeds=None, attention_mask=None,
             sampling: SamplingConfig = SamplingConfig(), rng: Optional[jax.Array] = None
             ) -> GenerationOutput:
  """Generates up to `sampling.max_new_tokens` tokens per row.

  input_ids [B, T] int or inputs_embeds [B, T, D]; attention_mask [B, T] (1 = real token,
  left or right padding; default all ones). Compiles once per (B, T, sampling).
  """
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError("pass exactly one of input_ids / inputs_embeds")
  if input_ids is not None:
    input_ids = jnp.asarray(input_ids, jnp.int32)
    inputs_embeds = model.apply({"params": params}, input_ids, method=CausalLM.embed)
  inputs_embeds = jnp.asarray(inputs_embeds)
  b, t = inputs_embeds.shape[:2]
  mask = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
  if mask.shape != (b, t):
    raise ValueError(f"attention_mask shape {mask.shape} != inputs {(b, t)}")
  if not bool(jnp.all(mask.any(axis=1))):
    raise ValueError("every row needs at least one real token (attention_mask row of zeros)")
  if rng is None:
    rng = jax.random.key(0)
  tokens, num, step_logits = _generate(model, params, inputs_embeds, mask, rng, sampling)
  return GenerationOutput(np.asarray(tokens), np.asarray(num),
                          np.asarray(step_logits) if sampling.return_logits else None)


def eos_ids_for(tokenizer, extra: Sequence[str] = ("<|im_end|>", "<|endoftext|>")) -> tuple[int, ...]:
  """The stop ids ChatRex uses: the tokenizer's EOS plus the chat end markers it knows."""
  ids = set()
  if getattr(tokenizer, "eos_token_id", None) is not None:
    ids.add(int(tokenizer.eos_token_id))
  vocab = tokenizer.get_vocab()
  ids.update(int(vocab[s]) for s in extra if s in vocab)
  return tuple(sorted(ids))
