"""CLIP vision tower: live equivalence with transformers, converter, golden fixture.

What is proven here:
* `CLIPVisionTower` == transformers `CLIPVisionModel` (tiny random config, every parameter
  perturbed so LayerNorm affines are not the identity) for every hidden state, several
  select layers, both feature selections, last_hidden_state and pooler_output, and with
  position-embedding interpolation at a non-square input size; fp32, max abs <= 1e-5 of the
  output scale.
* The converter is strict (all problems at once) and bit-identical both ways for the HF and
  the MLLM prefixes; full `CLIPModel` checkpoints load (text keys ignored explicitly).
* The golden fixture `clip_vision` passes through `check_equivalence`.
"""
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from chatrex_jax import testing
from chatrex_jax.convert import clip as clip_convert
from chatrex_jax.convert import mapping
from chatrex_jax.models import clip_vit

TOL = 1e-5  # docs/architecture.md "Numeric tolerances": fp32 blocks, max abs <= 1e-5 of output scale

HF_KW = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             image_size=28, patch_size=7, num_channels=3, hidden_act="quick_gelu",
             layer_norm_eps=1e-5)


def _perturbed(module, seed, sigma=0.05):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(sigma * torch.randn(p.shape, generator=g))
  return module.eval()


@pytest.fixture(scope="module")
def hf_model():
  torch.manual_seed(0)
  cfg = transformers.CLIPVisionConfig(**HF_KW)
  return _perturbed(transformers.CLIPVisionModel(cfg), 1)


@pytest.fixture(scope="module")
def state(hf_model):
  return testing.torch_to_numpy_state(hf_model)


def _pixels(b, h, w, seed=2):
  return np.random.default_rng(seed).standard_normal((b, 3, h, w)).astype(np.float32)


def _nhwc(x):
  return jnp.asarray(x.transpose(0, 2, 3, 1))


def _ours(cfg, state, pixels_nchw, **kw):
  model = clip_vit.CLIPVisionTower(cfg)
  x = _nhwc(pixels_nchw)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  params = clip_convert.to_flax(state, cfg, expected=abstract)
  return jax.jit(lambda p, x: model.apply({"params": p}, x, **kw))(params, x)


def _ref(hf_model, pixels, interpolate=False):
  with torch.no_grad():
    out = hf_model(torch.from_numpy(pixels), output_hidden_states=True,
                   interpolate_pos_encoding=interpolate)
  return out


def test_from_hf_reads_vision_and_full_configs(hf_model):
  d = hf_model.config.to_dict()
  cfg = clip_vit.CLIPVisionConfig.from_hf(d)
  assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size,
          cfg.image_size, cfg.layer_norm_eps, cfg.hidden_act) == (32, 3, 4, 7, 28, 1e-5, "quick_gelu")
  assert cfg.select_layer == -2 and cfg.select_feature == "patch"
  full = transformers.CLIPConfig(vision_config=HF_KW).to_dict()
  full["mm_vision_select_layer"] = -1
  cfg2 = clip_vit.CLIPVisionConfig.from_hf(full)
  assert cfg2.hidden_size == 32 and cfg2.select_layer == -1
  with pytest.raises(ValueError, match="select_layer"):
    clip_vit.CLIPVisionConfig.from_hf(d, select_layer=5)


@pytest.mark.parametrize("select_layer,select_feature",
                         [(-2, "patch"), (-1, "cls_patch"), (0, "patch"), (1, "cls_patch")])
def test_features_match_transformers(hf_model, state, highest_precision, select_layer,
                                     select_feature):
  cfg = clip_vit.CLIPVisionConfig.from_hf(hf_model.config.to_dict(), select_layer=select_layer,
                                          select_feature=select_feature)
  pixels = _pixels(2, 28, 28)
  got = _ours(cfg, state, pixels)
  want = _ref(hf_model, pixels).hidden_states[select_layer].numpy()
  if select_feature == "patch":
    want = want[:, 1:]
  testing.assert_close_to_scale(got, want, TOL, f"features[{select_layer}]")


def test_all_outputs_match_transformers(hf_model, state, highest_precision):
  cfg = clip_vit.CLIPVisionConfig.from_hf(hf_model.config.to_dict())
  pixels = _pixels(2, 28, 28, seed=3)
  got = _ours(cfg, state, pixels, output="all")
  ref = _ref(hf_model, pixels)
  assert got["hidden_states"].shape == (4, 2, 17, 32)
  for i, h in enumerate(ref.hidden_states):
    testing.assert_close_to_scale(got["hidden_states"][i], h.numpy(), TOL, f"hidden_states[{i}]")
  testing.assert_close_to_scale(got["last_hidden_state"], ref.last_hidden_state.numpy(), TOL,
                                "last_hidden_state")
  testing.assert_close_to_scale(got["pooler_output"], ref.pooler_output.numpy(), TOL, "pooler")
  testing.assert_close_to_scale(got["features"], ref.hidden_states[-2][:, 1:].numpy(), TOL, "features")


def test_position_interpolation_matches_transformers(hf_model, state, highest_precision):
  cfg = clip_vit.CLIPVisionConfig.from_hf(hf_model.config.to_dict(), select_layer=-1,
                                          select_feature="cls_patch", interpolate_pos_encoding=True)
  pixels = _pixels(1, 42, 35, seed=4)  # 6x5 grid from a 4x4 trained grid
  got = _ours(cfg, state, pixels)
  want = _ref(hf_model, pixels, interpolate=True).hidden_states[-1].numpy()
  assert got.shape == (1, 31, 32)
  testing.assert_close_to_scale(got, want, TOL, "interpolated")


def test_other_size_without_interpolation_is_an_error(hf_model, state):
  cfg = clip_vit.CLIPVisionConfig.from_hf(hf_model.config.to_dict())
  with pytest.raises(ValueError, match="interpolate_pos_encoding"):
    _ours(cfg, state, _pixels(1, 42, 42))
  with pytest.raises(ValueError, match="NHWC"):
    jax.eval_shape(clip_vit.CLIPVisionTower(cfg).init, jax.random.key(0), jnp.zeros((1, 3, 28, 28)))


def test_bicubic_matrix_matches_torch():
  x = np.random.default_rng(0).standard_normal((1, 1, 5, 5)).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(9, 3), mode="bicubic",
                                         align_corners=False).numpy()[0, 0]
  got = clip_vit.bicubic_matrix(5, 9) @ x[0, 0] @ clip_vit.bicubic_matrix(5, 3).T
  testing.assert_close_to_scale(got, want, 1e-6, "bicubic")


@pytest.mark.parametrize("prefix", ["", clip_convert.PREFIX_HF, clip_convert.PREFIX_MLLM])
def test_converter_round_trip_is_bit_identical(state, prefix):
  # transformers 5 names CLIPVisionModel keys without a prefix; 4.x checkpoints and CLIPModel
  # use `vision_model.`; the MLLM `vision_tower.vision_tower.vision_model.`.
  cfg = clip_vit.CLIPVisionConfig.from_hf(HF_KW)
  renamed = {prefix + k: v for k, v in state.items()}
  params = clip_convert.to_flax(renamed, cfg)  # prefix auto-detected
  back = clip_convert.to_torch(params, cfg, prefix=prefix)
  assert set(back) == set(renamed)
  for k, v in renamed.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
  mapping.check_bijective(clip_convert.rules(cfg, prefix))
  params2 = clip_convert.to_flax(back, cfg, prefix=prefix)
  for p, v in mapping.flatten(params).items():
    assert np.array_equal(mapping.flatten(params2)[p], v)


def test_converter_reports_every_problem_at_once(state):
  cfg = clip_vit.CLIPVisionConfig.from_hf(HF_KW)
  bad = {"vision_model." + k: v for k, v in state.items()}
  del bad["vision_model.encoder.layers.1.mlp.fc1.bias"]
  del bad["vision_model.pre_layrnorm.weight"]
  bad["vision_model.encoder.layers.7.mlp.fc1.bias"] = np.zeros(64, np.float32)
  bad["vision_model.embeddings.class_embedding"] = np.zeros(33, np.float32)
  model = clip_vit.CLIPVisionTower(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"]
  with pytest.raises(mapping.ConversionError) as err:
    clip_convert.to_flax(bad, cfg, expected=abstract)
  e = err.value
  assert len(e.missing) == 2 and len(e.unexpected) == 1 and len(e.misshaped) == 1, str(e)
  assert "layers.7" in str(e) and "class_embedding" in str(e)


def test_converter_accepts_full_clip_model_checkpoints():
  torch.manual_seed(0)
  full = transformers.CLIPModel(transformers.CLIPConfig(
      vision_config=HF_KW, text_config=dict(hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            vocab_size=50), projection_dim=8))
  sd = testing.torch_to_numpy_state(full)
  sd["vision_model.embeddings.position_ids"] = np.arange(17)[None]  # older transformers kept it
  assert any(k.startswith("text_model.") for k in sd)
  cfg = clip_vit.CLIPVisionConfig.from_hf(HF_KW)
  params = clip_convert.to_flax(sd, cfg)
  np.testing.assert_array_equal(params["embeddings"]["class_embedding"],
                                sd["vision_model.embeddings.class_embedding"])


def test_params_carry_logical_axes_and_remat_is_equivalent(state, highest_precision):
  cfg = clip_vit.CLIPVisionConfig.from_hf(HF_KW)
  x = _nhwc(_pixels(1, 28, 28))
  boxed = jax.eval_shape(clip_vit.CLIPVisionTower(cfg).init, jax.random.key(0), x)["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda l: hasattr(l, "names"))
  assert leaves and all(hasattr(l, "names") and len(l.names) == l.value.ndim for l in leaves)
  params = clip_convert.to_flax(state, cfg)

  def loss(p, c):
    return jnp.sum(clip_vit.CLIPVisionTower(c).apply({"params": p}, x) ** 2)
  g1 = jax.grad(loss)(params, cfg)
  g2 = jax.grad(loss)(params, dataclasses.replace(cfg, remat=True))
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # select layer -2 does not use the last layer: its gradient is exactly zero, the rest is not
  assert not np.any(np.asarray(g1["layers_2"]["fc1"]["kernel"]))
  assert np.any(np.asarray(g1["layers_0"]["fc1"]["kernel"]))


def test_golden_clip_vision_passes(golden_dir):
  from chatrex_jax.tools import check_equivalence
  out = io.StringIO()
  ok = check_equivalence.check(golden_dir / "clip_vision", out=out)
  assert ok, out.getvalue()
  assert "PASS clip_vision" in out.getvalue()
