"""Decoder equivalence against transformers Qwen2/LLaMA, layouts, packing, sharding, generation."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from chatrex_jax.convert import llm as llm_convert
from chatrex_jax.inference.generate import SamplingConfig, generate, select_token
from chatrex_jax.models.llm import CausalLM, LLMConfig
from chatrex_jax.testing import assert_close_to_scale
from chatrex_jax.train import sharding
from tests.builders import BASE, make_hf, to_flax

torch.set_num_threads(2)







CASES = [("qwen2", False), ("qwen2", True), ("llama", False), ("llama", True)]


@pytest.mark.parametrize("family,tied", CASES)
def test_logits_match_transformers_long_padded_batch(family, tied, highest_precision):
  hf, state = make_hf(family, tied)
  config, model, params = to_flax(hf, state)
  assert config.family == family and config.tie_word_embeddings == tied
  assert config.attention_bias == (family == "qwen2")
  rng = np.random.default_rng(1)
  ids = rng.integers(1, BASE["vocab_size"], (2, 576))  # RoPE bugs hide in short sequences
  mask = np.ones_like(ids)
  mask[1, 401:] = 0  # right padding
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  got = np.asarray(model.apply({"params": params}, jnp.asarray(ids),
                               key_valid=jnp.asarray(mask, bool))["logits"])
  real = mask.astype(bool)
  assert_close_to_scale(got[real], ref[real], 1e-5, f"{family} tied={tied} logits")


def test_rope_scaling_llama3_matches_transformers(highest_precision):
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 64}
  hf, state = make_hf("llama", False, rope_scaling=scaling)
  config, model, params = to_flax(hf, state)
  assert config.rope_scaling_dict["rope_type"] == "llama3"
  ids = np.random.default_rng(2).integers(1, 384, (1, 300))
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.numpy()
  got = np.asarray(model.apply({"params": params}, jnp.asarray(ids))["logits"])
  assert_close_to_scale(got, ref, 1e-5, "llama3 rope")


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_greedy_generation_identical_to_hf_generate(family, highest_precision):
  hf, state = make_hf(family, False, seed=3)
  config, model, params = to_flax(hf, state)
  rng = np.random.default_rng(4)
  ids = rng.integers(1, 384, (3, 12))
  mask = np.ones_like(ids)
  mask[1, :5] = 0  # left padding, as HF batched generation expects
  mask[2, :2] = 0
  ids = np.where(mask == 1, ids, 0)
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = 0
  with torch.no_grad():
    ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=32,
                      do_sample=False)[:, ids.shape[1]:].numpy()
  sampling = SamplingConfig(max_new_tokens=32)
  batched = generate(model, params, input_ids=ids, attention_mask=mask, sampling=sampling)
  np.testing.assert_array_equal(batched.tokens, ref)
  for row in range(3):  # unbatched, unpadded
    single = generate(model, params, input_ids=ids[row:row + 1, mask[row] == 1], sampling=sampling)
    np.testing.assert_array_equal(single.tokens[0], ref[row])
  # Right padding is left-aligned internally: identical results.
  right_ids = np.stack([np.concatenate([r[m == 1], r[m == 0]]) for r, m in zip(ids, mask)])
  right_mask = np.sort(mask, axis=1)[:, ::-1].copy()
  right = generate(model, params, input_ids=right_ids, attention_mask=right_mask, sampling=sampling)
  np.testing.assert_array_equal(right.tokens, ref)
  # Scanned layers keep one stacked cache (each step's layer slices in and out of the loop),
  # unscanned ones a cache per layer: the same tokens.
  scanned = dataclasses.replace(config, scan_layers=True)
  out = generate(CausalLM(scanned), llm_convert.to_flax(state, scanned), input_ids=ids,
                 attention_mask=mask, sampling=sampling)
  np.testing.assert_array_equal(out.tokens, ref)


def test_out_in_kernel_layout_is_the_same_model(highest_precision):
  """`kernel_layout="out_in"` (torch's [out, in], the inference loaders' choice) converts from
  torch with reshapes only, computes HF's logits and the in_out model's tokens and loss, and
  `change_kernel_layout` / export move between the layouts exactly, scanned or not."""
  from flax.core import meta

  from chatrex_jax.models.llm import change_kernel_layout, stack_layers
  from chatrex_jax.models.vocab import resize_vocab
  hf, state = make_hf("qwen2", False, seed=11)   # q/k/v bias and an untied LM head
  config, model, params = to_flax(hf, state)
  config_o, model_o, params_o = to_flax(hf, state, kernel_layout="out_in")
  assert params_o["decoder"]["layers_0"]["self_attn"]["o_proj"]["kernel"].shape == (64, 4, 16)
  ids = np.random.default_rng(12).integers(1, BASE["vocab_size"], (2, 64))
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.numpy()
  out = model_o.apply({"params": params_o}, jnp.asarray(ids))
  assert_close_to_scale(np.asarray(out["logits"]), ref, 1e-5, "out_in logits")
  # the fused LM head + cross-entropy reads the [V, D] head too
  targets, valid = jnp.asarray(ids[:, 1:]), jnp.ones((2, 63), bool)
  loss = lambda m, p: m.apply({"params": p}, out["hidden"][:, :-1], targets, valid,
                              method=CausalLM.token_loss)[0]
  np.testing.assert_allclose(float(loss(model_o, params_o)), float(loss(model, params)), rtol=1e-6)
  same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  moved_config, moved = change_kernel_layout(params, config, "out_in")
  assert moved_config == config_o and same(moved, params_o)
  assert same(change_kernel_layout(params_o, config_o, "in_out")[1], params)
  scanned, scanned_o = (dataclasses.replace(c, scan_layers=True) for c in (config, config_o))
  assert same(change_kernel_layout(stack_layers(params, 2), scanned, "out_in")[1], stack_layers(params_o, 2))
  assert all(np.array_equal(v, state[k]) for k, v in llm_convert.to_torch(params_o, config_o))
  sampling = SamplingConfig(max_new_tokens=16)
  np.testing.assert_array_equal(generate(model_o, params_o, input_ids=ids[:, :20], sampling=sampling).tokens,
                                generate(model, params, input_ids=ids[:, :20], sampling=sampling).tokens)
  grown, grown_config = resize_vocab(params, config, 400, 16)
  grown_o, _ = resize_vocab(params_o, config_o, 400, 16)
  assert same(meta.unbox(grown_o), change_kernel_layout(grown, grown_config, "out_in")[1])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_fused_kernel_layout_is_the_same_model(family, highest_precision):
  """`kernel_layout="out_in_fused"` (q / k / v one kernel, gate / up one kernel) loads from torch,
  computes HF's logits and the in_out model's tokens at batch 1 and 3, and moves to and from
  the other layouts and back to torch exactly, scanned or not."""
  from chatrex_jax.models.llm import change_kernel_layout, stack_layers
  hf, state = make_hf(family, False, seed=13)   # qwen2: q / k / v biases join too
  config, model, params = to_flax(hf, state)
  config_f, model_f, params_f = to_flax(hf, state, kernel_layout="out_in_fused")
  attn = params_f["decoder"]["layers_0"]["self_attn"]
  assert set(attn) == {"qkv_proj", "o_proj"} and attn["qkv_proj"]["kernel"].shape == (4 + 2 * 2, 16, 64)
  assert params_f["decoder"]["layers_0"]["mlp"]["gate_up_proj"]["kernel"].shape == (2, 160, 64)
  assert ("bias" in attn["qkv_proj"]) == (family == "qwen2")
  ids = np.random.default_rng(14).integers(1, BASE["vocab_size"], (3, 48))
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.numpy()
  got = model_f.apply({"params": params_f}, jnp.asarray(ids))["logits"]
  assert_close_to_scale(np.asarray(got), ref, 1e-5, "fused logits")
  sampling = SamplingConfig(max_new_tokens=16)
  for rows in (1, 3):   # one row, and the kernel-first products of a few rows
    np.testing.assert_array_equal(
        generate(model_f, params_f, input_ids=ids[:rows, :20], sampling=sampling).tokens,
        generate(model, params, input_ids=ids[:rows, :20], sampling=sampling).tokens)
  same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  for source_config, source in ((config, params), (*change_kernel_layout(params, config, "out_in"),)):
    moved_config, moved = change_kernel_layout(source, source_config, "out_in_fused")
    assert moved_config == config_f and same(moved, params_f)
  assert same(change_kernel_layout(params_f, config_f, "in_out")[1], params)
  scanned, scanned_f = (dataclasses.replace(c, scan_layers=True) for c in (config, config_f))
  stacked_f = change_kernel_layout(stack_layers(params, 2), scanned, "out_in_fused")[1]
  assert same(stacked_f, stack_layers(params_f, 2))
  assert same(change_kernel_layout(stacked_f, scanned_f, "in_out")[1], stack_layers(params, 2))
  assert all(np.array_equal(v, state[k]) for k, v in llm_convert.to_torch(params_f, config_f))
  with pytest.raises(ValueError, match="change_kernel_layout"):
    llm_convert.rules(config_f)


@pytest.mark.parametrize("rows", [1, 2, 8, 32, 33, 96])
def test_out_in_projection_every_row_count(rows, highest_precision):
  """An [out, in] kernel gives the [in, out] kernel's product and gradient at every row count:
  up to `KERNEL_FIRST_MAX_ROWS` rows (decoding) it is the product's left operand."""
  from chatrex_jax.models.layers import Projection
  rng = np.random.default_rng(rows)
  x = jnp.asarray(rng.standard_normal((rows, 2, 24), np.float32))  # [rows, heads, head_dim]
  kernel = rng.standard_normal((2, 24, 40), np.float32)              # [heads, head_dim, out]
  bias = rng.standard_normal((40,), np.float32)
  in_out = Projection((40,), ("heads", "kv"), ("embed",))
  out_in = Projection((40,), ("heads", "kv"), ("embed",), kernel_out_first=True)
  p_io = {"params": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}
  p_oi = {"params": {"kernel": jnp.asarray(np.moveaxis(kernel, 2, 0)), "bias": jnp.asarray(bias)}}
  ref = np.einsum("rhd,hdo->ro", np.asarray(x, np.float64), kernel) + bias
  for module, p in ((in_out, p_io), (out_in, p_oi)):
    assert_close_to_scale(np.asarray(module.apply(p, x)), ref, 1e-5, f"{rows} rows")
    grad = jax.grad(lambda x, m=module, p=p: jnp.sum(jnp.sin(m.apply(p, x))))(x)
    assert_close_to_scale(np.asarray(grad), np.einsum("ro,hdo->rhd", np.cos(ref), kernel), 1e-5,
                          f"gradient at {rows} rows")


@pytest.mark.parametrize("batch", [1, 8, 40])
def test_tied_lm_head_at_every_batch(batch, highest_precision):
  """The tied head (the embedding as an [out, in] kernel) gives HF's logits for one decode
  step's rows: the embedding is the product's left operand from 2 to 32 rows."""
  hf, state = make_hf("llama", True, seed=13)
  config, model, params = to_flax(hf, state)
  h = np.random.default_rng(batch).standard_normal((batch, 1, config.hidden_size)).astype(np.float32)
  with torch.no_grad():
    ref = hf.lm_head(torch.from_numpy(h)).numpy()
  got = model.apply({"params": params}, jnp.asarray(h), method=CausalLM.logits_from_hidden)
  assert_close_to_scale(np.asarray(got), ref, 1e-5, f"tied head logits at batch {batch}")


def test_generation_from_embeddings_and_eos_stop():
  hf, state = make_hf("qwen2", False, seed=5)
  config, model, params = to_flax(hf, state)
  ids = np.random.default_rng(6).integers(1, 384, (2, 9))
  free = generate(model, params, input_ids=ids, sampling=SamplingConfig(max_new_tokens=12))
  eos = int(free.tokens[0, 3])  # force row 0 to stop at its 4th token
  embeds = model.apply({"params": params}, jnp.asarray(ids), method=CausalLM.embed)
  out = generate(model, params, inputs_embeds=embeds,
                 sampling=SamplingConfig(max_new_tokens=12, eos_ids=(eos,), pad_id=-1))
  first = int(np.argmax(free.tokens[0] == eos))
  np.testing.assert_array_equal(out.tokens[0, :first + 1], free.tokens[0, :first + 1])
  assert (out.tokens[0, first + 1:] == -1).all() and out.lengths[0] == first + 1
  row1_stop = np.flatnonzero(free.tokens[1] == eos)
  n1 = row1_stop[0] + 1 if len(row1_stop) else 12
  np.testing.assert_array_equal(out.tokens[1, :n1], free.tokens[1, :n1])


def test_sampling_top_p_and_temperature():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4096))
  keys = jax.random.key(0)
  greedy = select_token(logits, keys, 0.0, 1.0)
  assert (np.asarray(greedy) == 0).all()
  top = np.asarray(select_token(logits, keys, 1.0, 0.7))
  assert set(np.unique(top)) == {0, 1}  # 0.5 < 0.7, so token 1 is kept; 0.8 >= 0.7 stops
  full = np.bincount(np.asarray(select_token(logits, keys, 1.0, 1.0)), minlength=4) / 4096
  np.testing.assert_allclose(full, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_scanned_and_remat_layouts_equal_unscanned(highest_precision):
  hf, state = make_hf("qwen2", False, seed=7)
  config, model, params = to_flax(hf, state)
  ids = jnp.asarray(np.random.default_rng(8).integers(1, 384, (2, 40)))
  ref = model.apply({"params": params}, ids)["logits"]
  for overrides in ({"scan_layers": True}, {"remat_policy": "full"},
                    {"scan_layers": True, "remat_policy": "dots"}):
    cfg = dataclasses.replace(config, **overrides)
    p = llm_convert.to_flax(state, cfg)
    out = CausalLM(cfg).apply({"params": p}, ids)["logits"]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
    if cfg.scan_layers:  # conversion back from the scanned layout is exact
      back = dict(llm_convert.to_torch(p, cfg))
      assert all(np.array_equal(back[k], state[k]) for k in state)


def test_packed_segments_equal_separate_sequences(highest_precision):
  hf, state = make_hf("llama", False, seed=9)
  config, model, params = to_flax(hf, state)
  rng = np.random.default_rng(10)
  a, b = rng.integers(1, 384, 23), rng.integers(1, 384, 17)
  packed = jnp.asarray(np.concatenate([a, b])[None])
  seg = jnp.asarray(np.r_[np.ones(23), 2 * np.ones(17)].astype(np.int32)[None])
  pos = jnp.asarray(np.r_[np.arange(23), np.arange(17)][None])
  out = np.asarray(model.apply({"params": params}, packed, positions=pos, segment_ids=seg)["logits"])
  for sl, ids in ((slice(0, 23), a), (slice(23, 40), b)):
    ref = np.asarray(model.apply({"params": params}, jnp.asarray(ids[None]))["logits"])
    np.testing.assert_allclose(out[:, sl], ref, atol=1e-5, rtol=1e-5)


def test_logical_axis_names_on_every_parameter():
  config = LLMConfig(**BASE)
  abstract = jax.eval_shape(CausalLM(config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  leaves = jax.tree.leaves(abstract["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim


@pytest.mark.parametrize("std", [0.02, 0.1])
def test_initializer_range_sets_every_matrix_init_and_round_trips(std):
  """HF's `initializer_range`: the std of every matrix's normal init (norm scales stay 1), read
  from and written to config.json."""
  config = LLMConfig(**dict(BASE, vocab_size=512, hidden_size=128, intermediate_size=256,
                            num_attention_heads=4, num_key_value_heads=2), initializer_range=std)
  params = nn.unbox(CausalLM(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):   # RMSNorm
      np.testing.assert_array_equal(leaf, 1.0)
    elif "bias" not in name:
      assert abs(float(np.std(leaf)) - std) < 0.1 * std, (name, float(np.std(leaf)))
  assert LLMConfig.from_hf(config.to_hf()).initializer_range == std
  assert LLMConfig.from_hf({k: v for k, v in config.to_hf().items() if k != "initializer_range"}
                           ).initializer_range == 0.02   # HF's default


def test_fsdp_sharded_forward_equals_unsharded(n_devices, highest_precision):
  assert n_devices == 8, "conftest must give JAX 8 CPU devices"
  config = LLMConfig(**dict(BASE, hidden_size=128, num_attention_heads=8, num_key_value_heads=4))
  model = CausalLM(config)
  ids = jnp.asarray(np.random.default_rng(11).integers(1, 384, (8, 32)))
  boxed = model.init(jax.random.key(1), ids)
  params = nn.unbox(boxed)["params"]
  ref = model.apply({"params": params}, ids)["logits"]
  for mesh_shape in ({"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}):
    mesh = sharding.make_mesh(**{"data": 1, "fsdp": 1, "tensor": 1, **mesh_shape})
    shardings = sharding.logical_shardings(boxed["params"], mesh)
    sharded = jax.device_put(params, shardings)
    assert sharded["embed_tokens"]["embedding"].sharding.spec[1] == "fsdp"

    @jax.jit
    def fwd(p, x):
      with nn.logical_axis_rules(list(sharding.FSDP_RULES)):
        return model.apply({"params": p}, x)["logits"]
    with jax.set_mesh(mesh):
      out = fwd(sharded, jax.device_put(ids, sharding.batch_sharding(mesh, 2)))
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
