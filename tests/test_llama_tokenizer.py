"""The LLaMA / Vicuna tokenizer the way the official code runs it (`use_fast=False` under
transformers 4.x), against ids and texts transformers 4.46.3 itself produced
(tests/fixtures/llama_spm, made by tests/fixtures/make_llama_spm.py)."""
import json
import pathlib
import shutil

import pytest

from chatrex_jax.protocol import tokenize
from chatrex_jax.protocol import tokens as C
from chatrex_jax.protocol.llama_tokenizer import SentencePieceLlamaTokenizer

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "llama_spm"
CASES = json.loads((FIXTURE / "cases.json").read_text())


def release_folder(tmp_path, legacy: bool) -> pathlib.Path:
  """A tokenizer folder as a Vicuna-based ChatRex release holds it: tokenizer.model, the config
  (legacy as given) and the 104 ChatRex tokens added at ids 32000-32103."""
  tok = SentencePieceLlamaTokenizer(vocab_file=str(FIXTURE / "tokenizer.model"), legacy=legacy)
  assert tok.add_tokens(list(C.SPECIAL_TOKENS), special_tokens=True) == 104
  out = tmp_path / ("legacy" if legacy else "nonlegacy")
  tok.save_pretrained(out)
  return out


@pytest.mark.parametrize("variant", ["legacy", "nonlegacy"])
def test_ids_and_decoding_match_transformers_4_slow_tokenizer(tmp_path, variant):
  want = CASES["variants"][variant]
  folder = release_folder(tmp_path, want["legacy"])
  tok = tokenize.load_tokenizer(folder)
  assert isinstance(tok, SentencePieceLlamaTokenizer) and tok.legacy is want["legacy"]
  assert len(tok) == 32104 and tok.convert_tokens_to_ids("<obj0>") == 32000
  assert tok.convert_tokens_to_ids("</objects>") == 32103
  for text, ids in want["texts"].items():
    assert tok.encode(text, add_special_tokens=False) == ids, repr(text)
  for text, ids in want["with_bos"].items():
    assert tok.encode(text) == ids, repr(text)
  for prompt, ids in want["prompts"].items():   # the official tokenizer_image_object_token
    assert tokenize.tokenize_with_placeholders(prompt, tok) == ids, repr(prompt)
  for text, decoded in want["decoded"].items():
    assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False) == decoded


def test_transformers_5_fast_tokenizer_differs_on_these_prompts(tmp_path):
  """Why the project does not use transformers 5's own LlamaTokenizer here: on the same files
  it encodes some ChatRex texts differently from the official slow tokenizer."""
  from transformers import AutoTokenizer
  folder = release_folder(tmp_path, legacy=True)
  fast = AutoTokenizer.from_pretrained(folder, local_files_only=True)
  want = CASES["variants"]["legacy"]["texts"]
  differ = [t for t, ids in want.items() if fast.encode(t, add_special_tokens=False) != ids]
  assert differ, "transformers' converted tokenizer now agrees: load_tokenizer could use it"


def test_other_tokenizers_load_with_autotokenizer(tmp_path):
  from chatrex_jax.data.tiny_tokenizer import build_tiny_tokenizer
  build_tiny_tokenizer(tmp_path / "bpe")
  assert not isinstance(tokenize.load_tokenizer(tmp_path / "bpe"), SentencePieceLlamaTokenizer)
  only_model = tmp_path / "only_model"        # a release that ships tokenizer.model alone
  only_model.mkdir()
  shutil.copy(FIXTURE / "tokenizer.model", only_model / "tokenizer.model")
  tok = tokenize.load_tokenizer(only_model)
  assert isinstance(tok, SentencePieceLlamaTokenizer) and tok.bos_token == "<s>" and len(tok) == 32000
