"""Tokenisation with ChatRex's placeholders, and training labels.

* `load_tokenizer`: a checkpoint's tokenizer as the official code loads it (`use_fast=False`).
* `tokenize_with_placeholders`: the official `tokenizer_image_object_token`: BOS when the
  tokenizer's own encoding adds one, the text split on `<image>` / `<objfeat>` (delimiters
  kept), each other chunk encoded separately with `add_special_tokens=False`, `<image>` -> -200,
  `<objfeat>` -> -300.
* `build_training_example`: ids + labels for a multi-turn conversation; only assistant responses
  and the end-of-turn token (`<|im_end|>` for ChatML as XTuner's SUFFIX_AS_EOS, `</s>` for
  Vicuna) are labelled; prompt, separators and placeholders are IGNORE_INDEX.
"""
from __future__ import annotations

import pathlib
import re
from typing import Sequence

import numpy as np

from chatrex_jax.errors import UserError
from chatrex_jax.protocol import tokens as C
from chatrex_jax.protocol.templates import EOS_CHUNK, ChatTemplate, apply_template, conversation_chunks, detect_template

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path):
  """A checkpoint folder's tokenizer, loaded as the official code loads it (`use_fast=False`
  under transformers 4.x): a sentencepiece LLaMA / Vicuna tokenizer (`tokenizer.model`) as that
  slow class (`llama_tokenizer.SentencePieceLlamaTokenizer`; transformers 5's converted one
  encodes ChatRex prompts differently), any other with `AutoTokenizer` (local files only; a
  gs:// folder is read from a local mirror)."""
  from chatrex_jax import storage
  from chatrex_jax.protocol import llama_tokenizer
  if storage.is_remote(path) and storage.path(path).is_dir():
    path = storage.cached_copy(path)   # the tokenizers read local files
  folder = pathlib.Path(path)
  if not folder.is_dir() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
    raise UserError(f"{path}: {'no tokenizer files' if folder.is_dir() else 'no such folder'} "
                    f"(expected one of {', '.join(TOKENIZER_FILES)}); give the checkpoint or "
                    "tokenizer folder (a converted checkpoint carries its tokenizer)")
  if llama_tokenizer.is_sentencepiece_llama(path):
    return llama_tokenizer.SentencePieceLlamaTokenizer.from_pretrained(path)
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(path, local_files_only=True)


def split_special_strings(text: str, specials: Sequence[str] = C.PLACEHOLDERS) -> list[str]:
  """Splits text on the special strings, keeping them, dropping empty pieces (official)."""
  pattern = "|".join(map(re.escape, specials))
  return [s for s in re.split(f"({pattern})", text) if s]


def _encode(tokenizer, text: str) -> list[int]:
  return list(tokenizer.encode(text, add_special_tokens=False))


def adds_bos(tokenizer) -> bool:
  """Whether a prompt starts with BOS: the tokenizer has one and its own encoding adds it.

  RexSeek's `tokenizer_image_object_token` prepends `bos_token_id` whenever it exists; that
  agrees with this rule on every tokenizer the official code meets (LLaMA/Vicuna add `<s>`,
  Qwen2 has no BOS). It differs only for ChatML tokenizers whose BOS is `<|im_start|>` but
  is never added by encoding (SmolLM2): the official rule would open every prompt with two
  `<|im_start|>`, which no such model was trained on.
  """
  bos = tokenizer.bos_token_id
  if bos is None:
    return False
  ids = tokenizer.encode("a", add_special_tokens=True)
  return bool(ids) and ids[0] == bos


def tokenize_with_placeholders(text: str, tokenizer, add_bos: bool | None = None) -> list[int]:
  """The official `tokenizer_image_object_token`: ids with -200 for `<image>`, -300 for
  `<objfeat>`; BOS first when `adds_bos(tokenizer)` (or add_bos says so)."""
  bos = tokenizer.bos_token_id
  add_bos = adds_bos(tokenizer) if add_bos is None else add_bos
  if add_bos and bos is None:
    raise ValueError("add_bos=True but the tokenizer has no BOS token")
  ids = [bos] if add_bos else []
  for chunk in split_special_strings(text):
    if chunk == C.DEFAULT_IMAGE_TOKEN:
      ids.append(C.IMAGE_TOKEN_INDEX)
    elif chunk == C.DEFAULT_OBJECT_FEATURE_TOKEN:
      ids.append(C.OBJECT_TOKEN_INDEX)
    else:
      ids.extend(_encode(tokenizer, chunk))
  return ids


def build_inference_ids(user_text: str, tokenizer, template: ChatTemplate | None = None,
                        system: str | None = None) -> np.ndarray:
  """Prompt ids (int64 [L], with placeholders) for one user turn wrapped in the chat template."""
  template = template or detect_template(tokenizer)
  return np.asarray(tokenize_with_placeholders(apply_template(template, user_text, system),
                                               tokenizer), np.int64)


def build_training_example(turns: Sequence[tuple[str, str]], tokenizer,
                           template: ChatTemplate | None = None, system: str | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids, labels), int64 [L] each, for a conversation [(user, assistant), ...].

  The user text of the first turn normally carries `<image>\\n<obj0><objfeat>...\\n`
  (see `protocol.prompts.build_user_text`). Labels: the assistant answers plus the end-of-turn
  token (template suffix or eos id); everything else (BOS, prompts, separators, placeholders)
  is IGNORE_INDEX. Placeholders may appear in any chunk and always get IGNORE_INDEX.
  """
  template = template or detect_template(tokenizer)
  ids: list[int] = []
  labels: list[int] = []
  if adds_bos(tokenizer):
    ids.append(tokenizer.bos_token_id)
    labels.append(C.IGNORE_INDEX)
  for text, labelled in conversation_chunks(template, turns, system):
    if (text, labelled) == EOS_CHUNK:
      if tokenizer.eos_token_id is None:
        raise ValueError(f"template {template.name} needs an eos token; the tokenizer has none")
      piece = [tokenizer.eos_token_id]
    else:
      piece = tokenize_with_placeholders(text, tokenizer, add_bos=False)
    ids.extend(piece)
    labels.extend(p if labelled and p >= 0 else C.IGNORE_INDEX for p in piece)
  return np.asarray(ids, np.int64), np.asarray(labels, np.int64)
