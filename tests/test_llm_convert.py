"""LLM checkpoint conversion: exact round trips, HF loadability, streaming memory bounds, errors."""
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from chatrex_jax.convert import llm as llm_convert
from chatrex_jax.convert import safetensors_io
from chatrex_jax.convert.mapping import ConversionError, check_bijective
from chatrex_jax.models import vocab
from chatrex_jax.models.llm import CausalLM, LLMConfig
from chatrex_jax.tools import check_equivalence
from tests.builders import make_hf, to_flax


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("llama", True)])
def test_round_trip_torch_flax_torch_is_bit_identical(family, tied, tmp_path):
  hf, state = make_hf(family, tied, seed=21)
  config, model, params = to_flax(hf, state)
  check_bijective(llm_convert.rules(config))
  back = dict(llm_convert.to_torch(params, config))
  expected_keys = set(state) - ({"lm_head.weight"} if tied else set())
  assert set(back) == expected_keys
  for k in expected_keys:
    assert back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k]), k
  # ... and the written folder loads in transformers with identical outputs.
  llm_convert.save(params, config, tmp_path / "hf", max_shard_bytes=64 * 1024)
  assert (tmp_path / "hf" / safetensors_io.INDEX_NAME).exists()  # several shards + index
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "hf", attn_implementation="eager").eval()
  assert type(reloaded) is type(hf)
  reloaded_state = reloaded.state_dict()
  for k, v in hf.state_dict().items():
    assert torch.equal(reloaded_state[k], v), k
  ids = torch.tensor(np.random.default_rng(0).integers(1, 384, (1, 20)))
  with torch.no_grad():
    assert torch.equal(reloaded(ids).logits, hf(ids).logits)
  # ... and reads back through the streaming loader.
  config2, params2 = llm_convert.load(tmp_path / "hf")
  assert config2.tie_word_embeddings == tied
  flat = jax.tree.leaves(jax.tree.map(np.array_equal, params, params2))
  assert all(flat)


def test_conversion_reports_every_problem_at_once():
  hf, state = make_hf("qwen2", False, seed=22)
  config = LLMConfig.from_hf(hf.config.to_dict())
  bad = dict(state)
  del bad["model.layers.0.mlp.up_proj.weight"]
  del bad["model.norm.weight"]
  bad["model.layers.1.self_attn.o_proj.weight"] = np.zeros((64, 32), np.float32)
  bad["vision_tower.extra"] = np.zeros(3, np.float32)
  expected = jax.eval_shape(CausalLM(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  with pytest.raises(ConversionError) as err:
    llm_convert.to_flax(bad, config, expected=expected)
  e = err.value
  assert "model.layers.0.mlp.up_proj.weight" in e.missing and "model.norm.weight" in e.missing
  assert e.unexpected == ["vision_tower.extra"]
  assert len(e.misshaped) == 1 and "o_proj" in e.misshaped[0]
  assert "missing keys (2)" in str(e)


def test_tied_checkpoint_with_divergent_lm_head_is_refused():
  hf, state = make_hf("llama", True, seed=23)
  config = LLMConfig.from_hf(hf.config.to_dict())
  state = dict(state, **{"lm_head.weight": state["model.embed_tokens.weight"] + 1})
  with pytest.raises(ConversionError, match="tie_word_embeddings"):
    llm_convert.to_flax(state, config)


def test_vocab_extension_matches_spec():
  hf, state = make_hf("qwen2", False, seed=24)
  config, model, params = to_flax(hf, state)
  # Qwen-style: the tokenizer is shorter than the matrix; 104 tokens appended -> may shrink.
  for tokenizer_len in (300, 350):
    new_vocab = tokenizer_len + 104
    new, cfg = vocab.resize_vocab(params, config, new_vocab, 104)
    emb, head = np.asarray(new["embed_tokens"]["embedding"]), np.asarray(new["lm_head"]["kernel"])
    assert emb.shape == (new_vocab, 64) and head.shape == (64, new_vocab) and cfg.vocab_size == new_vocab
    old_emb, old_head = state["model.embed_tokens.weight"], state["lm_head.weight"].T
    keep = min(384, new_vocab)
    base = new_vocab - 104
    np.testing.assert_array_equal(emb[:base], old_emb[:base])
    np.testing.assert_allclose(emb[base:], np.broadcast_to(old_emb[:base].mean(0), (104, 64)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(head[:, base:], np.broadcast_to(old_head[:, :base].mean(1, keepdims=True), (64, 104)),
                               rtol=1e-6, atol=1e-7)
    assert keep <= emb.shape[0]
    out = CausalLM(cfg).apply({"params": new}, jnp.zeros((1, 3), jnp.int32))["logits"]
    assert out.shape == (1, 3, new_vocab)


def test_golden_qwen2_lm_passes_check_equivalence(golden_dir, capsys):
  assert check_equivalence.main([str(golden_dir / "qwen2_lm")]) == 0
  assert "PASS qwen2_lm" in capsys.readouterr().out


_MEMORY_PROBE = textwrap.dedent("""
    import json, os, sys, resource
    from chatrex_jax.convert import llm as llm_convert
    def hwm():
      for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
    def rss():
      for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
    mode, src, dst = sys.argv[1:4]
    base = rss()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
      f.write("5")
    if mode == "disk":
      llm_convert.convert_hf_to_flax_checkpoint(src, dst, max_shard_bytes=32 * 2**20)
    else:
      cfg, params = llm_convert.load(src)
    print(json.dumps({"peak_extra": hwm() - base}))
""")


def _make_big_checkpoint(path, layers=6, hidden=1024, ffn=4096, vocab_size=2048):
  config = LLMConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                     num_attention_heads=8, num_key_value_heads=8, family="llama", attention_bias=False)
  rng = np.random.default_rng(0)

  def tensors():
    for rule in llm_convert.rules(config):
      shape = {"embed_tokens/embedding": (vocab_size, hidden), "decoder/norm/scale": (hidden,),
               "lm_head/kernel": (vocab_size, hidden)}.get(rule.flax_path)
      if shape is None:
        leaf = rule.torch_key.rsplit(".", 2)[-2]
        shape = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
                 "o_proj": (hidden, hidden), "gate_proj": (ffn, hidden), "up_proj": (ffn, hidden),
                 "down_proj": (hidden, ffn)}.get(leaf, (hidden,))
      yield rule.torch_key, rng.standard_normal(shape, dtype=np.float32)
  names = safetensors_io.save_sharded(tensors(), path, max_shard_bytes=48 * 2**20)
  (path / "config.json").write_text(json.dumps(config.to_hf()))
  return sum((path / n).stat().st_size for n in names), len(names)


def test_sharded_checkpoint_converts_with_bounded_memory(tmp_path):
  size, shards = _make_big_checkpoint(tmp_path / "src")
  assert shards > 4 and size > 400 * 2**20
  probe = tmp_path / "probe.py"
  probe.write_text(_MEMORY_PROBE)

  def run(mode):
    out = subprocess.run([sys.executable, str(probe), mode, str(tmp_path / "src"), str(tmp_path / mode)],
                         capture_output=True, text=True, check=True,
                         env={"JAX_PLATFORMS": "cpu", **__import__("os").environ})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra"]
  cap = 128 * 2**20  # disk-to-disk: one 32 MiB output shard + a few tensors in flight
  disk_peak = run("disk")
  assert disk_peak < cap < size / 3, (disk_peak / 2**20, size / 2**20)
  # In-memory load: about one copy of the model, never two.
  mem_peak = run("memory")
  assert mem_peak < 1.25 * size, (mem_peak / 2**20, size / 2**20)
  # The disk conversion is complete and exact.
  src, dst = safetensors_io.Checkpoint(tmp_path / "src"), safetensors_io.Checkpoint(tmp_path / "disk")
  config = LLMConfig.from_hf(json.loads((tmp_path / "src" / "config.json").read_text()))
  for rule in llm_convert.rules(config)[:5] + llm_convert.rules(config)[-3:]:
    np.testing.assert_array_equal(dst[rule.flax_path], rule.layout.to_flax(src[rule.torch_key]))
  assert len(dst) == len(llm_convert.rules(config))


def test_add_chatrex_tokens_to_a_local_tokenizer(tmp_path):
  from chatrex_jax.data.tiny_tokenizer import build_tiny_tokenizer
  from chatrex_jax.protocol.tokens import SPECIAL_TOKENS
  tok = build_tiny_tokenizer(tmp_path / "tok", add_chatrex_tokens=False, vocab_size=300)
  assert len(tok) <= 384  # like Qwen: the embedding matrix is at least the tokenizer
  hf, state = make_hf("qwen2", False, seed=25)
  config, model, params = to_flax(hf, state)
  base = len(tok)
  new, cfg = vocab.add_chatrex_tokens(params, config, tok)
  assert len(tok) == base + 104 and cfg.vocab_size == base + 104
  assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(base, base + 104))
  emb = np.asarray(new["embed_tokens"]["embedding"])
  np.testing.assert_allclose(emb[base:], np.broadcast_to(state["model.embed_tokens.weight"][:base].mean(0), (104, 64)),
                             rtol=1e-6, atol=1e-7)
  again, cfg2 = vocab.add_chatrex_tokens(new, cfg, tok)  # idempotent
  assert cfg2.vocab_size == cfg.vocab_size and len(tok) == base + 104
