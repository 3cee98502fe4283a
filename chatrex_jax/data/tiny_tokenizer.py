"""A small, real, offline tokenizer for tests and the demo (no hub access).

`build_tiny_tokenizer(out_dir, texts, family=...)` trains a byte-level BPE with the `tokenizers`
library on the given texts (deterministic: same texts and settings -> same vocabulary), adds
the chat special tokens of the LLM family and the 104 ChatRex tokens (`<obj0>`..`<obj99>`,
`<ground>`, `</ground>`, `<objects>`, `</objects>`) as special tokens, wraps it in
`transformers.PreTrainedTokenizerFast`, saves it to out_dir and returns
`AutoTokenizer.from_pretrained(out_dir)` - the same loading path a real checkpoint takes.

family "qwen": no BOS, `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (eos), like
  Qwen2.5-Instruct.  family "llama": BOS `<s>`, EOS `</s>`, UNK `<unk>`, like Vicuna/LLaMA.
Byte-level BPE encodes any unicode text (no unknown tokens) and decodes it back exactly.
"""
from __future__ import annotations

import os
import pathlib
from typing import Iterable, Literal

from chatrex_jax.protocol import tokens as C

DEFAULT_TEXTS = (
    "Please detect person; pigeon in this image. Answer the question with object indexes.",
    "What is the category name of the object? Answer the question with its category name.",
    "Can you provide me with a brief description of the region? A brown dog is lying on a bed.",
    "Please breifly describe this image in one sentence and detect all the mentioned objects.",
    "A man in a red shirt is riding a bicycle next to a woman holding an umbrella.",
    "There is no such thing in this image. How many cars are there in this image?",
    "Answer the question in grounded format. The cat sits on a plaid couch near the window.",
)

FAMILY_SPECIALS = {
    "qwen": dict(specials=[C.QWEN_ENDOFTEXT, C.QWEN_IM_START, C.QWEN_IM_END],
                 bos=None, eos=C.QWEN_IM_END, pad=C.QWEN_ENDOFTEXT, unk=None),
    "llama": dict(specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", pad=None, unk="<unk>"),
}


def build_tiny_tokenizer(out_dir: str | os.PathLike, texts: Iterable[str] = DEFAULT_TEXTS, *,
                         family: Literal["qwen", "llama"] = "qwen", vocab_size: int = 400,
                         min_frequency: int = 1, add_chatrex_tokens: bool = True,
                         isolate_spaces: bool = False):
  """Trains, saves and reloads a tiny tokenizer; returns the loaded HF tokenizer.

  isolate_spaces: every space is a token of its own ("Find the shoe" -> Find, " ", the, " ",
  shoe), so a word is the same token after a space and after `<ground>`; the GPT-2 rule (the
  default) makes " shoe" and "shoe" two unrelated tokens, a mapping a tiny model must learn.

  vocab_size counts the 256 byte symbols + merges (+ the family specials); the ChatRex tokens
  are appended after it (ids vocab_size .. vocab_size + 103, as the official resize appends).
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import AutoTokenizer, PreTrainedTokenizerFast

  if family not in FAMILY_SPECIALS:
    raise ValueError(f"family must be one of {sorted(FAMILY_SPECIALS)}, got {family!r}")
  spec = FAMILY_SPECIALS[family]
  tok = Tokenizer(models.BPE())
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.pre_tokenizer = (pre_tokenizers.Sequence([
      pre_tokenizers.Split(" ", behavior="isolated"), byte_level]) if isolate_spaces else byte_level)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=list(spec["specials"]), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(texts), trainer=trainer)
  if spec["bos"] is not None:  # LLaMA: encode(..., add_special_tokens=True) prepends BOS
    tok.post_processor = processors.TemplateProcessing(
        single=f"{spec['bos']} $A", pair=f"{spec['bos']} $A {spec['bos']} $B",
        special_tokens=[(spec["bos"], tok.token_to_id(spec["bos"]))])
  kwargs = {k + "_token": spec[k] for k in ("bos", "eos", "pad", "unk") if spec[k] is not None}
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)
  if add_chatrex_tokens:
    hf.add_tokens(list(C.SPECIAL_TOKENS), special_tokens=True)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  hf.save_pretrained(out)
  return AutoTokenizer.from_pretrained(out)
