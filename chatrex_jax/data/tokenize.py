"""Chat templates, placeholder-aware tokenisation, training labels and the embedding-merge plan.

Spec B.7 / B.8 / B.11 and E.1.

* `ChatTemplate`: the XTuner-style fields (SYSTEM / INSTRUCTION / SUFFIX / SUFFIX_AS_EOS / SEP /
  STOP_WORDS). `QWEN_CHAT` is RexSeek's template (`<|im_start|>user\\n{input}<|im_end|>\\n
  <|im_start|>assistant\\n`, no system turn at inference). `VICUNA_V1` is LLaVA's
  `conv_vicuna_v1` ("{system} USER: {input} ASSISTANT:", answers end with `</s>`), the likely
  template of a Vicuna/LLaMA-based ChatRex-7B (spec E.1: unverified; check the checkpoint).
  `detect_template` picks one from the tokenizer and/or the checkpoint config.
* `tokenize_with_placeholders`: the official `tokenizer_image_object_token`: BOS only when the
  tokenizer has one, the text split on `<image>` / `<objfeat>` (delimiters kept), each other chunk
  encoded separately with `add_special_tokens=False`, `<image>` -> -200, `<objfeat>` -> -300.
* `build_training_example`: ids + labels for a multi-turn conversation; only assistant responses
  and the end-of-turn token (`<|im_end|>` for Qwen as XTuner's SUFFIX_AS_EOS, `</s>` for
  Vicuna) are labelled; prompt, separators and placeholders are IGNORE_INDEX.
* `merge_plan`: the static-shape form of `prepare_inputs_labels_for_multimodal` (B.8), computed
  on the host with numpy: for each sample and each position of the merged (right-padded,
  length-T) sequence, where its embedding comes from (text token / image patch k / object j /
  padding), plus labels, attention mask, position ids and the scatter positions of the image
  and object tokens. `merge_embeddings` applies it inside `jit` with gathers + `where`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np

from chatrex_jax.data import constants as C

# Merged-sequence source codes (same values as the chatrex_forward fixture's merged_token_types).
SOURCE_PAD = -1
SOURCE_TEXT = 0
SOURCE_IMAGE = 1
SOURCE_OBJECT = 2

# ------------------------------------------------------------------------------------------
# Chat templates

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A chat template (XTuner field names).

  system: format string with `{system}`, prepended to the first turn when a system text is used.
  default_system: the system text used when none is given (None: no system turn).
  instruction: the user turn, format string with `{input}` (and optionally `{round}`).
  response_prefix: text put before each assistant answer (labelled with the answer).
  suffix: text appended to each answer (labelled).
  suffix_as_eos: True -> the suffix is the end-of-turn marker; False -> the tokenizer's eos id is
    appended after the answer (labelled).
  sep: text after each completed turn (not labelled).
  stop_words: generation stops on these strings.
  """
  name: str
  instruction: str
  system: str = ""
  default_system: str | None = None
  response_prefix: str = ""
  suffix: str = ""
  suffix_as_eos: bool = True
  sep: str = ""
  stop_words: tuple[str, ...] = ()


QWEN_CHAT = ChatTemplate(
    name="qwen_chat",
    system="<|im_start|>system\n{system}<|im_end|>\n",
    instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    suffix="<|im_end|>", suffix_as_eos=True, sep="\n",
    stop_words=("<|im_end|>", "<|endoftext|>"))

VICUNA_V1 = ChatTemplate(
    name="vicuna_v1",
    system="{system} ", default_system=VICUNA_SYSTEM,
    instruction="USER: {input} ASSISTANT:",
    response_prefix=" ", suffix="", suffix_as_eos=False, sep="",
    stop_words=("</s>",))

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (QWEN_CHAT, VICUNA_V1)}


def get_template(name: str) -> ChatTemplate:
  if name not in TEMPLATES:
    raise ValueError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}")
  return TEMPLATES[name]


_QWEN_TYPES = ("qwen", "qwen2", "qwen2_5", "qwen2_moe", "qwen3", "rexseek_qwen")
_LLAMA_TYPES = ("llama", "llava", "llava_llama", "vicuna", "chatrex_llama")


def _get(cfg: Any, key: str, default=None):
  if cfg is None:
    return default
  if isinstance(cfg, Mapping):
    return cfg.get(key, default)
  return getattr(cfg, key, default)


def render(template: ChatTemplate, turns: Sequence[tuple[str, str | None]], system: str | None = None,
           eos_token: str = "") -> str:
  """The conversation as one string (the eos of a `suffix_as_eos=False` template as `eos_token`)."""
  return "".join(eos_token if chunk == EOS_CHUNK else chunk[0]
                 for chunk in conversation_chunks(template, turns, system))


def template_from_tokenizer(tokenizer) -> tuple[ChatTemplate, str | None] | None:
  """The known template that renders a conversation exactly as the tokenizer's own chat
  template (its Jinja `chat_template`) does, and the system text that Jinja template inserts
  by itself (None if it inserts none). None when the tokenizer has no chat template or it
  matches no known template.

  The check renders a two-turn conversation with sentinel texts both ways, so it holds for the
  prompt layout, the answer suffix and the separators, not just for the first turn.
  """
  if not getattr(tokenizer, "chat_template", None):
    return None
  u1, a1, u2 = "\x02first question\x02", "\x02first answer\x02", "\x02second question\x02"
  messages = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
              {"role": "user", "content": u2}]
  try:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  except Exception:  # a template that cannot render plain turns (tools, images): not ours
    return None
  turns = [(u1, a1), (u2, None)]
  eos = getattr(tokenizer, "eos_token", None) or ""
  for template in TEMPLATES.values():
    if render(template, turns, system="", eos_token=eos) == text:
      return template, None
    marker = "\x02system\x02"
    before, _, after = render(template, turns, system=marker, eos_token=eos).partition(marker)
    if text.startswith(before) and text.endswith(after) and len(text) > len(before) + len(after):
      system = text[len(before):len(text) - len(after)]
      if render(template, turns, system=system, eos_token=eos) == text:
        return template, system
  return None


def detect_template(tokenizer: Any = None, config: Any = None) -> ChatTemplate:
  """The chat template of a tokenizer (and/or checkpoint config).

  In order: the tokenizer's own Jinja chat template, matched against the known templates
  (`template_from_tokenizer`); its vocabulary (`<|im_start|>` -> QWEN_CHAT (ChatML); a `<s>`
  BOS, the LLaMA sentencepiece vocabulary -> VICUNA_V1); only then the config's `model_type` /
  `architectures` (Qwen -> QWEN_CHAT; LLaMA / LLaVA / Vicuna -> VICUNA_V1), which says which
  network the weights are, not how its tokenizer was chat-trained. Raises ValueError when
  nothing tells (pass the template explicitly then).
  """
  if tokenizer is not None:
    found = template_from_tokenizer(tokenizer)
    if found is not None:
      return found[0]
    vocab = tokenizer.get_vocab()
    if C.QWEN_IM_START in vocab:
      return QWEN_CHAT
    if getattr(tokenizer, "bos_token", None) == "<s>" or "llama" in type(tokenizer).__name__.lower():
      return VICUNA_V1
  model_type = str(_get(config, "model_type", "") or "").lower()
  archs = " ".join(_get(config, "architectures", None) or []).lower()
  if model_type in _QWEN_TYPES or "qwen" in archs:
    return QWEN_CHAT
  if model_type in _LLAMA_TYPES or "llama" in archs or "llava" in archs:
    return VICUNA_V1
  raise ValueError(
      f"cannot tell the chat template (model_type={model_type!r}, architectures={archs!r}, "
      f"tokenizer={type(tokenizer).__name__}); pass one of {sorted(TEMPLATES)} explicitly")


def conversation_chunks(template: ChatTemplate, turns: Sequence[tuple[str, str | None]],
                        system: str | None = None) -> list[tuple[str, bool]]:
  """[(text, labelled)] chunks of a conversation; the last answer may be None (open turn).

  The eos of a `suffix_as_eos=False` template is not text: it is marked by the chunk
  ("<eos>", True) sentinel `EOS_CHUNK`, turned into the tokenizer's eos id by the encoder.
  """
  if not turns:
    raise ValueError("a conversation needs at least one (user, assistant) turn")
  sys_text = template.default_system if system is None else system
  chunks: list[tuple[str, bool]] = []
  for i, (user, answer) in enumerate(turns):
    prompt = template.instruction.format(input=user, round=i + 1)
    if i == 0 and sys_text:
      prompt = template.system.format(system=sys_text) + prompt
    chunks.append((prompt, False))
    if answer is None:
      if i != len(turns) - 1:
        raise ValueError(f"turn {i} has no answer but is not the last turn")
      break
    chunks.append((template.response_prefix + answer + template.suffix, True))
    if not template.suffix_as_eos:
      chunks.append(EOS_CHUNK)
    if template.sep:
      chunks.append((template.sep, False))
  return chunks


EOS_CHUNK = ("\x00<eos>\x00", True)


def apply_template(template: ChatTemplate, user_text: str, system: str | None = None) -> str:
  """The inference prompt string of one user turn (`INSTRUCTION.format(input=...)`, with the
  system turn only if the template has a default one or `system` is given)."""
  return "".join(t for t, _ in conversation_chunks(template, [(user_text, None)], system))


# ------------------------------------------------------------------------------------------
# Tokenisation


def load_tokenizer(path):
  """A checkpoint folder's tokenizer, loaded as the official code loads it (`use_fast=False`
  under transformers 4.x): a sentencepiece LLaMA / Vicuna tokenizer (`tokenizer.model`) as that
  slow class (`llama_tokenizer.SentencePieceLlamaTokenizer`; transformers 5's converted one
  encodes ChatRex prompts differently), any other with `AutoTokenizer` (local files only)."""
  from chatrex_jax.data import llama_tokenizer
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
  (see `inference.prompts.build_user_text`). Labels: the assistant answers plus the end-of-turn
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


# ------------------------------------------------------------------------------------------
# Embedding-merge plan (B.8) - host side, static shapes


def merged_length(input_ids, num_image_tokens: int = C.NUM_IMAGE_TOKENS) -> int:
  """Length of the merged sequence: L - n_images + n_images * num_image_tokens."""
  ids = np.asarray(input_ids)
  n_img = int((ids == C.IMAGE_TOKEN_INDEX).sum())
  return int(ids.shape[0]) + n_img * (num_image_tokens - 1)


def merge_plan(input_ids: Sequence[Sequence[int]], *, labels: Sequence[Sequence[int]] | None = None,
               attention_mask: Sequence[Sequence[int]] | None = None,
               seq_len: int | None = None, num_objects: Sequence[int] | None = None,
               max_objects: int = C.MAX_NUM_OBJECTS, num_image_tokens: int = C.NUM_IMAGE_TOKENS,
               pad_token_id: int = C.DEFAULT_PAD_TOKEN_INDEX, truncate: bool = False
               ) -> dict[str, np.ndarray]:
  """The static-shape plan of `prepare_inputs_labels_for_multimodal` for a batch.

  Args:
    input_ids: B id sequences (any length) with at most one -200 (`<image>`) and any number of
      -300 (`<objfeat>`); the j-th -300 of a sample takes that sample's j-th object feature.
    labels: optional B label sequences aligned with input_ids (default all IGNORE_INDEX).
    attention_mask: optional B masks; tokens with mask 0 are dropped first (official).
    seq_len: T, the static merged length (default: the longest merged sample).
    num_objects: boxes per sample; more -300 placeholders than boxes is an error.
    max_objects: M, width of `object_positions` (the model's padded box count).
    num_image_tokens: NI, tokens per image (576 for the released model).
    truncate: a merged sample longer than T is cut to T (as the official
      `tokenizer_model_max_length` truncation) instead of raising.

  Returns numpy arrays (int32 unless noted), right-padded:
    token_ids [B, T]: vocabulary id on text positions, pad_token_id elsewhere.
    source [B, T]: SOURCE_TEXT 0 / SOURCE_IMAGE 1 / SOURCE_OBJECT 2 / SOURCE_PAD -1.
    source_index [B, T]: image patch k or object j for those positions, else 0.
    labels [B, T]: text labels; IGNORE_INDEX on image, object and padding positions.
    attention_mask [B, T]: 1 on the first lengths[b] positions.
    position_ids [B, T]: 0..lengths[b]-1, then 0.
    image_positions [B, NI]: merged position of image token k, -1 if absent (no image / cut).
    object_positions [B, M]: merged position of object j, -1 if absent.
    lengths [B].
  """
  b = len(input_ids)
  if b == 0:
    raise ValueError("empty batch")
  rows = []
  for i in range(b):
    ids = np.asarray(input_ids[i], np.int64).reshape(-1)
    lab = (np.full(ids.shape, C.IGNORE_INDEX, np.int64) if labels is None
           else np.asarray(labels[i], np.int64).reshape(-1))
    if lab.shape != ids.shape:
      raise ValueError(f"sample {i}: labels length {lab.shape[0]} != input_ids length {ids.shape[0]}")
    if attention_mask is not None:
      keep = np.asarray(attention_mask[i]).reshape(-1).astype(bool)
      if keep.shape != ids.shape:
        raise ValueError(f"sample {i}: attention_mask length != input_ids length")
      ids, lab = ids[keep], lab[keep]
    is_img = ids == C.IMAGE_TOKEN_INDEX
    is_obj = ids == C.OBJECT_TOKEN_INDEX
    if is_img.sum() > 1:
      raise ValueError(f"sample {i}: {int(is_img.sum())} <image> placeholders; one is supported")
    bad = (ids < 0) & ~is_img & ~is_obj
    if bad.any():
      raise ValueError(f"sample {i}: negative ids {sorted(set(ids[bad].tolist()))} that are not "
                       "placeholders")
    n_obj = int(is_obj.sum())
    limit = max_objects if num_objects is None else min(int(num_objects[i]), max_objects)
    if n_obj > limit:
      raise ValueError(f"sample {i}: {n_obj} <objfeat> placeholders but only {limit} objects "
                       f"(num_objects={None if num_objects is None else num_objects[i]}, "
                       f"max_objects={max_objects})")
    rep = np.where(is_img, num_image_tokens, 1)
    start = np.concatenate([[0], np.cumsum(rep)[:-1]])
    n = int(rep.sum())
    src = np.repeat(np.where(is_img, SOURCE_IMAGE, np.where(is_obj, SOURCE_OBJECT, SOURCE_TEXT)),
                    rep)
    # index within its source: image patch k, or the running object count.
    obj_rank = np.cumsum(is_obj) - 1
    sidx = np.repeat(np.where(is_obj, obj_rank, 0), rep)
    if is_img.any():
      p = int(start[is_img][0])
      sidx[p:p + num_image_tokens] = np.arange(num_image_tokens)
    tok = np.repeat(np.where(is_img | is_obj, pad_token_id, ids), rep)
    lbl = np.repeat(np.where(is_img | is_obj, C.IGNORE_INDEX, lab), rep)
    rows.append((n, src, sidx, tok, lbl))
  t = seq_len if seq_len is not None else max(r[0] for r in rows)
  out = {
      "token_ids": np.full((b, t), pad_token_id, np.int32),
      "source": np.full((b, t), SOURCE_PAD, np.int32),
      "source_index": np.zeros((b, t), np.int32),
      "labels": np.full((b, t), C.IGNORE_INDEX, np.int32),
      "attention_mask": np.zeros((b, t), np.int32),
      "position_ids": np.zeros((b, t), np.int32),
      "image_positions": np.full((b, num_image_tokens), -1, np.int32),
      "object_positions": np.full((b, max_objects), -1, np.int32),
      "lengths": np.zeros((b,), np.int32),
  }
  for i, (n, src, sidx, tok, lbl) in enumerate(rows):
    if n > t:
      if not truncate:
        raise ValueError(f"sample {i}: merged length {n} > seq_len {t} (pass truncate=True to cut "
                         "it as the official tokenizer_model_max_length does)")
      n = t
    out["token_ids"][i, :n] = tok[:n]
    out["source"][i, :n] = src[:n]
    out["source_index"][i, :n] = sidx[:n]
    out["labels"][i, :n] = lbl[:n]
    out["attention_mask"][i, :n] = 1
    out["position_ids"][i, :n] = np.arange(n)
    out["lengths"][i] = n
    pos = np.arange(n)
    img = src[:n] == SOURCE_IMAGE
    out["image_positions"][i, sidx[:n][img]] = pos[img]
    obj = src[:n] == SOURCE_OBJECT
    out["object_positions"][i, sidx[:n][obj]] = pos[obj]
  return out


def merge_embeddings(token_embeds, image_embeds, object_embeds, source, source_index):
  """Applies a merge plan inside jit (gathers + where, no loops over tokens).

  token_embeds [B, T, D] (embed_tokens(token_ids)), image_embeds [B, NI, D],
  object_embeds [B, M, D] (M may be 0), source / source_index [B, T] int (from `merge_plan`)
  -> inputs_embeds [B, T, D] in token_embeds' dtype; padding positions are zero.
  """
  import jax.numpy as jnp
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
