"""Chat templates: how a conversation becomes the prompt string (XTuner field names).

* `ChatTemplate`: SYSTEM / INSTRUCTION / SUFFIX / SUFFIX_AS_EOS / SEP / STOP_WORDS.
  `QWEN_CHAT` is ChatML as RexSeek uses it (`<|im_start|>user\\n{input}<|im_end|>\\n
  <|im_start|>assistant\\n`, no system turn at inference). `VICUNA_V1` is LLaVA's
  `conv_vicuna_v1` ("{system} USER: {input} ASSISTANT:", answers end with `</s>`), the likely
  template of the Vicuna-based ChatRex-7B (its processor is remote code: unverified).
* `detect_template` reads it from the tokenizer (its own Jinja template, else its vocabulary),
  never from the network's `model_type`.
* `conversation_chunks` / `render` / `apply_template`: the prompt text of a conversation, as
  (text, labelled) chunks for training labels or as one string for inference.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from chatrex_jax.protocol import tokens as C

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
