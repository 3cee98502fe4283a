"""GGUF checkpoints (`chatrex_jax.convert.gguf`): tiny LLaMA and Qwen2 files written here the
way llama.cpp's converter writes them (its q/k row permutation for LLaMA, Q8_0 blocks, a
byte-level BPE vocabulary), read by this project and by transformers' own GGUF loader.

The real SmolLM2-135M-Instruct file is covered by tests/test_pretrained_llm.py.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chatrex_jax.convert import gguf as gguf_convert
from chatrex_jax.convert import llm as llm_convert
from chatrex_jax.convert.mapping import ConversionError
from chatrex_jax.data.tiny_tokenizer import build_tiny_tokenizer
from chatrex_jax.models.llm import CausalLM, LLMConfig
from chatrex_jax.tools import convert as convert_cli

gguf = pytest.importorskip("gguf")

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=1e4, rms_norm_eps=1e-5)


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf: HF rotate-half rows -> interleaved pairs (LLaMA q/k)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_state(config: LLMConfig, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(CausalLM(config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  import flax.linen as nn
  return dict(llm_convert.to_torch(nn.unbox(params), config))


def write_gguf(path, arch: str, config: LLMConfig, state, tokenizer, quant: str = "Q8_0") -> None:
  """A GGUF file as llama.cpp writes one: metadata, vocabulary, (quantised) tensors."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(config.num_hidden_layers)
  w.add_context_length(config.max_position_embeddings)
  w.add_embedding_length(config.hidden_size)
  w.add_feed_forward_length(config.intermediate_size)
  w.add_head_count(config.num_attention_heads)
  w.add_head_count_kv(config.num_key_value_heads)
  w.add_rope_freq_base(config.rope_theta)
  w.add_layer_norm_rms_eps(config.rms_norm_eps)
  w.add_rope_dimension_count(config.dim_per_head)
  w.add_vocab_size(config.vocab_size)
  vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("default")
  w.add_token_list([t for t, _ in vocab])
  specials = set(tokenizer.all_special_tokens) | set(tokenizer.added_tokens_encoder)
  w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
  w.add_token_merges([" ".join(m) for m in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]])
  w.add_eos_token_id(tokenizer.eos_token_id)
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
  per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}
  for key, value in state.items():
    if key in names:
      name = names[key]
    else:
      _, _, i, *rest = key.split(".")
      module, kind = ".".join(rest[:-1]), rest[-1]
      name = f"blk.{i}.{per_layer[module]}.{kind}"
    if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
      value = llama_cpp_permute(value, config.num_attention_heads if "attn_q" in name else config.num_key_value_heads)
    if quant == "Q8_0" and value.ndim == 2:
      w.add_tensor(name, gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0),
                   raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      w.add_tensor(name, value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=320, add_chatrex_tokens=False)


def model_files(tmp_path, tokenizer, arch: str, tied: bool, quant: str):
  family = "llama" if arch == "llama" else "qwen2"
  config = LLMConfig(vocab_size=len(tokenizer), tie_word_embeddings=tied, family=family,
                     attention_bias=family == "qwen2", **SIZES)
  state = hf_state(config, seed=3)
  path = tmp_path / f"{arch}.gguf"
  write_gguf(path, arch, config, state, tokenizer, quant)
  return config, state, path


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", False)])
def test_float_file_gives_back_the_hf_tensors_exactly(tmp_path, tokenizer, arch, tied):
  config, state, path = model_files(tmp_path, tokenizer, arch, tied, quant="F32")
  meta, hf_config, lazy = gguf_convert.read(path)
  got = dict(lazy)
  assert set(got) == set(state) - ({"lm_head.weight"} if tied else set())
  for key, value in got.items():   # the q/k permutation is undone exactly
    np.testing.assert_array_equal(value, state[key], err_msg=key)
  assert hf_config["model_type"] == ("llama" if arch == "llama" else "qwen2")
  assert hf_config["tie_word_embeddings"] is tied
  assert LLMConfig.from_hf(hf_config).attention_bias is (arch == "qwen2")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantised_file_matches_transformers_gguf_loader(tmp_path, tokenizer, arch, highest_precision):
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM
  _, _, path = model_files(tmp_path, tokenizer, arch, tied=arch == "llama", quant="Q8_0")
  config, params = gguf_convert.load(path)
  ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
  ids = np.asarray(tokenizer("Please detect the red circle in this image.")["input_ids"])[None]
  with torch.no_grad():
    want = ref(torch.from_numpy(ids)).logits.numpy()
  got = np.asarray(CausalLM(config).apply({"params": params}, jnp.asarray(ids))["logits"])
  assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_tokenizer_matches_transformers(tmp_path, tokenizer):
  from transformers import AutoTokenizer
  _, _, path = model_files(tmp_path, tokenizer, "llama", tied=True, quant="F32")
  meta, _, _ = gguf_convert.read(path)
  ours = gguf_convert.tokenizer(meta)
  ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  for text in ("Please detect person; pigeon in this image.", "  two  spaces\nand 12345 ü",
               "<|im_start|>user\nhello<|im_end|>"):
    assert ours(text)["input_ids"] == ref(text)["input_ids"] == tokenizer(text)["input_ids"], text
  assert ours.eos_token == tokenizer.eos_token


def test_convert_cli_writes_a_folder_transformers_loads(tmp_path, tokenizer, capsys, highest_precision):
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM, AutoTokenizer
  config, _, path = model_files(tmp_path, tokenizer, "llama", tied=True, quant="Q8_0")
  out = tmp_path / "hf"
  assert convert_cli.main(["llm", "--from", str(path), "--to", str(out)]) == 0
  assert "GGUF -> HF" in capsys.readouterr().out
  model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  loaded = AutoTokenizer.from_pretrained(out)
  ids = np.asarray(loaded("a red circle")["input_ids"])[None]
  with torch.no_grad():
    want = model(torch.from_numpy(ids)).logits.numpy()
  cfg, params = llm_convert.load(out)
  got = np.asarray(CausalLM(cfg).apply({"params": params}, jnp.asarray(ids))["logits"])
  np.testing.assert_allclose(got, want, atol=1e-5)
  # the folder round-trips through `convert llm` to Flax keys and back, unchanged
  assert convert_cli.main(["llm", "--from", str(out), "--to", str(tmp_path / "flax")]) == 0


def test_user_errors_are_named(tmp_path, tokenizer, capsys):
  config, state, path = model_files(tmp_path, tokenizer, "llama", tied=True, quant="F32")
  not_gguf = tmp_path / "x.gguf"
  not_gguf.write_bytes(b"not a gguf file at all")
  code = convert_cli.main(["llm", "--from", str(not_gguf), "--to", str(tmp_path / "o1")])
  assert code == 2 and "x.gguf" in capsys.readouterr().err
  broken = tmp_path / "broken.gguf"   # a file missing one layer's tensors
  del state["model.layers.1.mlp.down_proj.weight"]
  write_gguf(broken, "llama", config, state, tokenizer, quant="F32")
  with pytest.raises(ConversionError, match="blk.1.ffn_down.weight"):
    gguf_convert.load(broken)
  with pytest.raises(gguf_convert.GGUFError, match="architecture 'phi3'"):
    gguf_convert.hf_config({"general.architecture": "phi3"}, tied=True)
  with pytest.raises(gguf_convert.GGUFError, match="pip install"):
    gguf_convert.packaged_file("no_such_package_here", "x.gguf", "pip install something")
