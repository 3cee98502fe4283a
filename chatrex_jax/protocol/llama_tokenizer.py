"""The LLaMA / Vicuna sentencepiece tokenizer as the official ChatRex code runs it.

RexSeek and ChatRex load their tokenizer with `use_fast=False` under transformers 4.x: the
Python `LlamaTokenizer` over the `sentencepiece` library. transformers 5 has no such class
(`use_fast` is ignored; `LlamaTokenizer` is a converted `tokenizers` BPE), and the two differ on
ChatRex prompts: text right after an added token such as `<obj0>` or `<ground>`, and runs of
spaces, encode to other ids (tests/test_llama_tokenizer.py has cases). `SentencePieceLlamaTokenizer`
re-creates the 4.x slow behaviour on transformers' sentencepiece backend:

* encoding: added tokens are split out first; every other piece goes through sentencepiece,
  with its dummy prefix ("legacy", the 4.x default when tokenizer_config.json does not say) or,
  with `legacy: false`, one "▁" prefix for the whole text and none after added tokens;
* BOS / EOS added as `add_bos_token` / `add_eos_token` say;
* decoding: sentencepiece's own detokeniser between added tokens, which are joined with spaces
  (`spaces_between_special_tokens`, True in 4.x).

The fixture tests/fixtures/llama_spm holds ids that transformers 4.46.3 produced for a small
LLaMA-style sentencepiece model (made by tests/fixtures/make_llama_spm.py); the test holds this
class to them.
"""
from __future__ import annotations

import json
import os
import pathlib

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

SPIECE_UNDERLINE = "▁"


class SentencePieceLlamaTokenizer(SentencePieceBackend):
  """transformers 4.x `LlamaTokenizer` (slow) behaviour; see the module docstring."""

  vocab_files_names = {"vocab_file": "tokenizer.model"}
  model_input_names = ["input_ids", "attention_mask"]

  def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token=None,
               add_bos_token: bool = True, add_eos_token: bool = False, legacy: bool | None = None,
               add_prefix_space: bool = True, spaces_between_special_tokens: bool = True, **kwargs):
    self.add_bos_token = add_bos_token
    self.add_eos_token = add_eos_token
    self.add_prefix_space = add_prefix_space
    self.spaces_between_special_tokens = spaces_between_special_tokens
    kwargs.pop("tokenizer_class", None)
    super().__init__(vocab_file=vocab_file, unk_token=unk_token, bos_token=bos_token,
                     eos_token=eos_token, pad_token=pad_token,
                     legacy=True if legacy is None else legacy,
                     add_bos_token=add_bos_token, add_eos_token=add_eos_token,
                     add_prefix_space=add_prefix_space, **kwargs)

  # -- encoding ------------------------------------------------------------------------------

  def tokenize(self, text: str, **kwargs) -> list[str]:
    """4.x: without legacy, one "▁" prefix for the whole text (dropped before a leading
    special token); added tokens are split out by the base class."""
    if self.legacy or not text:
      return super().tokenize(text, **kwargs)
    text = text.replace(SPIECE_UNDERLINE, " ")
    if self.add_prefix_space:
      text = SPIECE_UNDERLINE + text
    tokens = super().tokenize(text, **kwargs)
    if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
      tokens = tokens[1:]
    return tokens

  def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
    bos = [self.bos_token_id] if self.add_bos_token else []
    eos = [self.eos_token_id] if self.add_eos_token else []
    out = bos + token_ids_0 + eos
    if token_ids_1 is not None:
      out += bos + token_ids_1 + eos
    return out

  # -- decoding ------------------------------------------------------------------------------

  def convert_tokens_to_string(self, tokens: list[str]) -> str:
    """sentencepiece's detokeniser; 4.x drops the prefix space it added itself."""
    tokens = list(tokens)
    if tokens and tokens[0].startswith(SPIECE_UNDERLINE) and self.add_prefix_space:
      tokens[0] = tokens[0][1:]
    out, pieces, prev_special = "", [], False
    for i, token in enumerate(tokens):
      if token in self.all_special_tokens:
        if not prev_special and i != 0 and self.legacy:
          out += " "
        out += self.sp_model.decode(pieces) + token
        prev_special, pieces = True, []
      else:
        if prev_special and i == 1 and self.add_prefix_space and not token.startswith(SPIECE_UNDERLINE):
          out += " "
        pieces.append(token)
        prev_special = False
    return out + self.sp_model.decode(pieces)

  def _decode(self, token_ids, skip_special_tokens: bool = False,
              clean_up_tokenization_spaces=None, spaces_between_special_tokens=None, **kwargs) -> str:
    """4.x `PreTrainedTokenizer._decode`: added tokens stand alone, runs between them are
    detokenised, and the parts are joined with spaces (`spaces_between_special_tokens`)."""
    if isinstance(token_ids, int):
      token_ids = [token_ids]
    between = (self.spaces_between_special_tokens if spaces_between_special_tokens is None
               else spaces_between_special_tokens)
    special_ids = set(self.all_special_ids)
    added = self.added_tokens_encoder
    parts, run = [], []
    for i in token_ids:
      if skip_special_tokens and i in special_ids:
        continue
      token = self.convert_ids_to_tokens(int(i))
      if token in added:
        if run:
          text = self.convert_tokens_to_string(run)
          if text:  # 4.x drops an empty run between added tokens (no double space)
            parts.append(text)
          run = []
        parts.append(token)
      else:
        run.append(token)
    if run:
      parts.append(self.convert_tokens_to_string(run))
    return (" " if between else "").join(parts)

  # -- files ---------------------------------------------------------------------------------

  def save_pretrained(self, save_directory, **kwargs):
    """Writes tokenizer.model + the config files, naming the class `LlamaTokenizer` (what the
    official code and transformers look for)."""
    out = super().save_pretrained(save_directory, **kwargs)
    config = pathlib.Path(save_directory) / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data.update(tokenizer_class="LlamaTokenizer", legacy=self.legacy, add_bos_token=self.add_bos_token,
                add_eos_token=self.add_eos_token)
    config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return out


def is_sentencepiece_llama(path: str | os.PathLike) -> bool:
  """A tokenizer folder the official code reads as a slow sentencepiece LlamaTokenizer."""
  path = pathlib.Path(path)
  if not (path / "tokenizer.model").exists():
    return False
  config = path / "tokenizer_config.json"
  cls = json.loads(config.read_text()).get("tokenizer_class", "") if config.exists() else ""
  return cls in ("", "LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer")
