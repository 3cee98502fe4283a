"""ChatRex MLLM assembly: golden forward, batched vs per-sample generation, checkpoint round trips."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chatrex_jax.convert import chatrex as chatrex_convert
from chatrex_jax.convert import safetensors_io
from chatrex_jax.convert.mapping import check_bijective
from chatrex_jax.inference.generate import SamplingConfig, generate
from chatrex_jax.models.chatrex import ChatRex, example_batch, lm_loss
from chatrex_jax.tools import check_equivalence
from chatrex_jax.tools.equivalence.chatrex import _batch, fixture_config
from chatrex_jax.tools.equivalence.registry import Fixture


@pytest.fixture(scope="module")
def golden(golden_dir):
  fx = Fixture(golden_dir / "chatrex_forward")
  config = fixture_config(fx.config)
  params = chatrex_convert.to_flax(fx.weights(), config)
  return fx, config, params


def test_golden_chatrex_forward_passes_check_equivalence(golden_dir, capsys):
  assert check_equivalence.main([str(golden_dir / "chatrex_forward")]) == 0
  assert "PASS chatrex_forward" in capsys.readouterr().out


def test_batched_generation_equals_per_sample(golden, highest_precision):
  fx, config, params = golden
  x = fx.inputs
  model = ChatRex(config)
  # Two prompts of different lengths and box counts: sample 0's prompt, and sample 1's prompt.
  prompts, counts = [], []
  for b in range(2):
    ids = x["input_ids"][b][x["attention_mask"][b] == 1]
    answer_start = np.flatnonzero(x["labels"][b] != -100)[0]
    prompts.append(ids[:answer_start])
    counts.append(int(x["num_gt_boxes_per_image"][b]))
  sampling = SamplingConfig(max_new_tokens=8)
  singles = []
  for b in range(2):
    batch, plan = _batch(config, [prompts[b]], None, None, x["pixel_values"][b:b + 1],
                         x["pixel_values_aux"][b:b + 1], x["gt_boxes"][b:b + 1], np.asarray(counts[b:b + 1]))
    embeds, _ = model.apply({"params": params}, batch, method=ChatRex.embed_inputs)
    singles.append(generate(model.llm_module, params["llm"], inputs_embeds=embeds,
                            attention_mask=plan["attention_mask"], sampling=sampling).tokens[0])
  assert len(prompts[0]) != len(prompts[1])
  batch, plan = _batch(config, prompts, None, None, x["pixel_values"], x["pixel_values_aux"],
                       x["gt_boxes"], np.asarray(counts))
  embeds, _ = model.apply({"params": params}, batch, method=ChatRex.embed_inputs)
  batched = generate(model.llm_module, params["llm"], inputs_embeds=embeds,
                     attention_mask=plan["attention_mask"], sampling=sampling)  # right-padded rows
  np.testing.assert_array_equal(batched.tokens, np.stack(singles))


def test_bf16_compute_matches_fp32(golden, highest_precision):
  """The whole MLLM (both towers, projectors, object encoder, LLM) with bf16 matmuls against
  fp32, on the golden batch's real (attention-mask) positions: the figure
  tests/test_pretrained_llm.py gives for the real SmolLM2 weights."""
  fx, config, params = golden
  x = fx.inputs
  batch, plan = _batch(config, x["input_ids"], x["attention_mask"], x["labels"], x["pixel_values"],
                       x["pixel_values_aux"], x["gt_boxes"], x["num_gt_boxes_per_image"])
  ref = ChatRex(config).apply({"params": params}, batch)["logits"]
  bf16 = fixture_config(fx.config, dtype=jnp.bfloat16)
  got = ChatRex(bf16).apply({"params": params}, batch)["logits"]
  assert got.dtype == jnp.float32  # logits stay in the accumulation dtype
  real = np.asarray(plan["attention_mask"], bool)
  p, q = jax.nn.log_softmax(ref[real], -1), jax.nn.log_softmax(got[real], -1)
  kl = float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))
  agree = float(np.mean(np.argmax(ref[real], -1) == np.argmax(got[real], -1)))
  print(f"\ngolden tiny ChatRex, bf16 compute vs fp32: KL {kl:.2e} per token over {int(real.sum())} "
        f"positions, top-1 agreement {agree:.3f}")
  assert kl <= 1e-3  # (a random model's near-tied logits make the top-1 agreement a weak signal)


@pytest.mark.parametrize("layout", ["rexseek", "llava"])
def test_checkpoint_round_trip_is_bit_identical(golden, layout, tmp_path):
  fx, config, params = golden
  rules = chatrex_convert.rules(config, layout)
  check_bijective(rules)
  state = fx.weights()
  if layout == "llava":  # the same tensors under LLaVA-style names
    mm = ("vision_tower.", "vision_tower_aux.", "mm_projector.", "mm_object_projector.")
    state = {("model." + k if k.startswith(mm) else k): v for k, v in state.items()}
  dst = chatrex_convert.save(params, config, tmp_path / "ckpt", layout=layout,
                                        max_shard_bytes=256 * 1024)
  written = safetensors_io.Checkpoint(dst)
  assert set(written) == set(state)
  for k, v in state.items():
    assert written[k].dtype == v.dtype and np.array_equal(written[k], v), k
  # The folder is self-describing: config recovered from config.json + tensor shapes.
  config2, params2, found = chatrex_convert.load(dst)
  assert found == layout
  assert config2.clip == config.clip and config2.convnext == config.convnext
  assert config2.llm == config.llm and config2.aux_image_size == config.aux_image_size
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, params2)))


def test_conversion_refuses_unknown_layout_and_reports_all_keys(golden):
  fx, config, _ = golden
  state = {k: v for k, v in fx.weights().items() if not k.startswith("mm_object_projector.")}
  state["mm_projector.9.weight"] = np.zeros(1, np.float32)
  with pytest.raises(ValueError) as err:
    chatrex_convert.to_flax(state, config)
  msg = str(err.value)
  assert "mm_object_projector.0.weight" in msg and "mm_projector.9.weight" in msg
  with pytest.raises(ValueError, match="not a ChatRex"):
    chatrex_convert.detect_layout(["model.embed_tokens.weight"])


@pytest.mark.slow  # ~2 minutes on 2 cores (three eager gradients of the whole model)
def test_frozen_aux_tower_gets_no_gradient(golden):
  _, config, params = golden
  batch = example_batch(config, batch_size=1, num_tokens=24, max_objects=2)
  rng = np.random.default_rng(0)
  batch = dict(batch, pixel_values=jnp.asarray(rng.standard_normal(batch["pixel_values"].shape), jnp.float32),
               pixel_values_aux=jnp.asarray(rng.standard_normal(batch["pixel_values_aux"].shape), jnp.float32),
               boxes=jnp.asarray([[[4., 4., 60., 70.], [10., 20., 100., 90.]]]), box_mask=jnp.ones((1, 2), bool),
               token_ids=jnp.asarray(rng.integers(1, 300, (1, 24)), jnp.int32),
               source=jnp.asarray(np.r_[[0, 0], np.ones(16), [2, 0, 2], np.zeros(3)][None], jnp.int32),
               source_index=jnp.asarray(np.r_[[0, 0], np.arange(16), [0, 0, 1], np.zeros(3)][None], jnp.int32))
  labels = jnp.asarray(np.r_[np.full(21, -100), rng.integers(1, 300, 3)][None])

  def loss_fn(p, cfg):
    return lm_loss(ChatRex(cfg).apply({"params": p}, batch)["logits"], labels)[0]
  grads = jax.grad(loss_fn)(params, config)
  norm = lambda tree: float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(tree)))
  assert norm(grads["vision_tower_aux"]) == 0.0  # released ConvNeXt: no_grad
  for name in ("vision_tower", "mm_projector", "mm_object_projector", "llm"):
    assert norm(grads[name]) > 0, name
  trainable = dataclasses.replace(config, train_vision_tower_aux=True)
  assert norm(jax.grad(loss_fn)(params, trainable)["vision_tower_aux"]) > 0


def test_from_dict_is_the_one_constructor_of_model_configs():
  """A training config's model section, models.tiny and a params dir's config.json all build
  their ChatRexConfig through ChatRexConfig.from_dict, and agree."""
  import json

  from chatrex_jax.configs import load_config
  from chatrex_jax.models import tiny
  from chatrex_jax.models.chatrex import ChatRexConfig
  from chatrex_jax.train.mllm_task import model_config
  cfg = load_config("chatrex_tiny", ["model.train_vision_tower=True"])
  assert model_config(cfg.model, vocab_size=300) == tiny.tiny_config(300)
  for family in ("qwen2", "llama"):
    config = tiny.tiny_config(300, family=family)
    on_disk = json.loads(json.dumps(chatrex_convert.config_to_json(config)))
    assert chatrex_convert.config_from_json(on_disk) == config
  sizes = dict(llm=tiny.llm_hf(300), clip=tiny.CLIP, convnext=tiny.CONVNEXT)
  with pytest.raises(ValueError, match=r"unknown ChatRexConfig fields \['aux_size'\]"):
    ChatRexConfig.from_dict(dict(sizes, aux_size=128))
  with pytest.raises(ValueError, match=r"lack \['convnext'\]"):
    ChatRexConfig.from_dict({k: v for k, v in sizes.items() if k != "convnext"})
