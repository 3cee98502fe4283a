"""ConvNeXt tower, projector and image-token fusion: live equivalence, converters, training.

What is proven here:
* `ConvNeXt` == timm `ConvNeXt` (tiny, random, perturbed weights) stage by stage, and == the
  trunk of open_clip `convnext_large_d_320` at full size (depths 3/3/27/3, dims 192..1536,
  random perturbed weights, 64 px input) for all four stage maps; fp32, max abs <= 1e-5 of
  the output scale.
* Converters for the RexSeek (`vision_stem`/`vision_stages`/`ramma`, bare and MLLM prefix),
  timm and open_clip layouts: bit-identical round trips, head/text keys ignored explicitly,
  every missing/unexpected/mis-shaped key reported at once.
* Stochastic depth is timm's DropPath (per sample, 0 or 1/keep); `remat` changes nothing.
* `MLP2xGELU` == torch `Sequential(Linear, GELU, Linear)`; `fuse_image_tokens` == RexSeek's
  `view(b, c, h*w).transpose(1, 2)` + `cat`.
* Gradients flow through both towers into the projector; a frozen/unfrozen optax update
  leaves frozen parameters bit-identical and moves the others.
* The golden fixture `convnext_aux` passes through `check_equivalence`.
"""
import dataclasses
import io

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import timm
import torch

from chatrex_jax import testing
from chatrex_jax.convert import convnext as cx_convert
from chatrex_jax.convert import mapping
from chatrex_jax.convert import projector as proj_convert
from chatrex_jax.models import clip_vit, convnext, projector

TOL = 1e-5
TINY = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))


def _perturb(module, seed, sigma=0.1, ls=(0.5, 1.5)):
  """Adds sigma*N(0,1) to every float param; layer scales ~ U(ls) (else 1e-6 hides bugs)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("gamma") or name.endswith("ramma"):
        p.copy_(ls[0] + (ls[1] - ls[0]) * torch.rand(p.shape, generator=g))
      else:
        p.add_(sigma * torch.randn(p.shape, generator=g))
  return module.eval()


def _torch_stages(trunk, x_nchw):
  with torch.no_grad():
    x = trunk.stem(torch.from_numpy(x_nchw))
    outs = []
    for stage in trunk.stages:
      x = stage(x)
      outs.append(x.numpy())
  return outs


def _run_ours(cfg, params, x_nchw):
  model = convnext.ConvNeXt(cfg)
  x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
  return [np.asarray(m) for m in convnext.to_nchw(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x))]


def _random_params(module, *args, seed=0, sigma=0.1):
  """Random parameters from shapes only (no jitted init: RNG-heavy inits compile slowly on CPU).

  LayerNorm scales ~ 1 + sigma*N, layer scales ~ U(0.5, 1.5), everything else sigma*N.
  """
  from flax.core import meta
  shapes = meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    if name == "layer_scale":
      return jnp.asarray(rng.uniform(0.5, 1.5, s.shape).astype(np.float32))
    base = 1.0 if name == "scale" else 0.0
    return jnp.asarray((base + sigma * rng.standard_normal(s.shape)).astype(np.float32))
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _expected(cfg, hw=64):
  return jax.eval_shape(convnext.ConvNeXt(cfg).init, jax.random.key(0),
                        jnp.zeros((1, hw, hw, cfg.in_chans)))["params"]


@pytest.fixture(scope="module")
def timm_tiny():
  torch.manual_seed(0)
  return _perturb(timm.models.convnext.ConvNeXt(num_classes=5, **TINY), 1)


def test_matches_timm_convnext(timm_tiny, highest_precision):
  cfg = convnext.ConvNeXtConfig(**TINY)
  sd = testing.torch_to_numpy_state(timm_tiny)
  assert any(k.startswith("head.") for k in sd)
  params = cx_convert.to_flax(sd, cfg, layout="timm", expected=_expected(cfg))
  x = np.random.default_rng(0).standard_normal((2, 3, 96, 64)).astype(np.float32)
  got = _run_ours(cfg, params, x)
  want = _torch_stages(timm_tiny, x)
  for s, (g, w) in enumerate(zip(got, want)):
    testing.assert_close_to_scale(g, w, TOL, f"stage {s}")


@pytest.mark.parametrize("impl", ["conv", "shift"])
def test_depthwise_impls_agree(impl, highest_precision):
  x = jax.random.normal(jax.random.key(0), (2, 9, 11, 5))
  k = jax.random.normal(jax.random.key(1), (7, 7, 1, 5))
  want = torch.nn.functional.conv2d(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()),
                                    torch.from_numpy(np.asarray(k).transpose(3, 2, 0, 1).copy()),
                                    padding=3, groups=5).numpy().transpose(0, 2, 3, 1)
  testing.assert_close_to_scale(convnext.depthwise_conv(x, k, impl), want, 1e-6, impl)


def test_matches_open_clip_convnext_large_d_320_trunk(highest_precision):
  """Full-size ConvNeXt-L trunk of open_clip (random weights), 64 px, all stage maps."""
  import open_clip
  torch.manual_seed(0)
  model = open_clip.create_model("convnext_large_d_320", pretrained=None)
  trunk = model.visual.trunk
  _perturb(trunk, 2, sigma=0.02, ls=(0.05, 0.15))
  sd = testing.torch_to_numpy_state(model)  # the whole CLIP checkpoint: text keys are ignored
  cfg = convnext.ConvNeXtConfig()           # ConvNeXt-L defaults
  params = cx_convert.to_flax(sd, cfg, expected=_expected(cfg))  # layout auto-detected
  assert cx_convert.detect_layout(sd) == ("open_clip", "visual.trunk.")
  x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
  got = _run_ours(cfg, params, x)
  want = _torch_stages(trunk, x)
  assert [g.shape for g in got] == [(1, 192, 16, 16), (1, 384, 8, 8), (1, 768, 4, 4), (1, 1536, 2, 2)]
  for s, (g, w) in enumerate(zip(got, want)):
    testing.assert_close_to_scale(g, w, TOL, f"stage {s}")
  # the same weights written back in the timm/open_clip layouts are bit-identical
  back = cx_convert.to_torch(params, cfg, layout="open_clip")
  for k, v in back.items():
    assert np.array_equal(v, sd[k]), k


@pytest.mark.parametrize("layout,prefix", [("rexseek", ""), ("rexseek", cx_convert.PREFIX_MLLM),
                                           ("timm", ""), ("open_clip", "visual.trunk."),
                                           ("open_clip", "trunk.")])
def test_converter_round_trip_is_bit_identical(timm_tiny, layout, prefix):
  cfg = convnext.ConvNeXtConfig(**TINY)
  params = cx_convert.to_flax(testing.torch_to_numpy_state(timm_tiny), cfg, layout="timm")
  sd = cx_convert.to_torch(params, cfg, layout=layout, prefix=prefix)
  mapping.check_bijective(cx_convert.rules(cfg, layout, prefix))
  assert cx_convert.detect_layout(sd) == (layout, prefix)
  if layout == "rexseek":
    assert any(k.endswith(".ramma") for k in sd) and prefix + "vision_stem.0.weight" in sd
  with_extras = dict(sd)
  if layout != "rexseek":  # classifier / projection heads and text keys are ignored explicitly
    with_extras[prefix + "head.norm.weight"] = np.ones(32, np.float32)
    if layout == "open_clip":
      with_extras[prefix[:-len("trunk.")] + "head.mlp.fc1.weight"] = np.ones((4, 32), np.float32)
      if prefix == "visual.trunk.":
        with_extras["transformer.resblocks.0.attn.in_proj_weight"] = np.ones((3, 1), np.float32)
  again = cx_convert.to_flax(with_extras, cfg, expected=_expected(cfg))
  flat, flat2 = mapping.flatten(params), mapping.flatten(again)
  assert flat.keys() == flat2.keys()
  for p in flat:
    assert flat[p].dtype == flat2[p].dtype and np.array_equal(flat[p], flat2[p]), p
  sd2 = cx_convert.to_torch(again, cfg, layout=layout, prefix=prefix)
  assert all(np.array_equal(sd[k], sd2[k]) for k in sd) and sd.keys() == sd2.keys()


def test_converter_reports_every_problem_at_once(timm_tiny):
  cfg = convnext.ConvNeXtConfig(**TINY)
  sd = testing.torch_to_numpy_state(timm_tiny)
  del sd["stages.2.blocks.1.gamma"]
  del sd["stem.1.bias"]
  sd["stages.4.blocks.0.gamma"] = np.ones(3, np.float32)
  sd["stages.1.downsample.1.weight"] = np.zeros((16, 8, 3, 3), np.float32)
  with pytest.raises(mapping.ConversionError) as err:
    cx_convert.to_flax(sd, cfg, layout="timm", expected=_expected(cfg))
  e = err.value
  assert len(e.missing) == 2 and len(e.unexpected) == 1 and len(e.misshaped) == 1, str(e)
  # head keys are ignored only where the layout says so: the RexSeek layout has no head
  sd = cx_convert.to_torch(cx_convert.to_flax(testing.torch_to_numpy_state(timm_tiny), cfg,
                                              layout="timm"), cfg, layout="rexseek")
  sd["head.fc.weight"] = np.zeros((5, 32), np.float32)
  with pytest.raises(mapping.ConversionError, match="head.fc.weight"):
    cx_convert.to_flax(sd, cfg, layout="rexseek")


def test_config_from_dict_rejects_unsupported_options():
  cfg = convnext.ConvNeXtConfig.from_dict({"dims": [8, 16, 32, 64], "depths": [1, 1, 2, 1],
                                           "kernel_sizes": 7, "norm_eps": None, "conv_mlp": False})
  assert cfg.dims == (8, 16, 32, 64) and cfg.norm_eps == 1e-6 and cfg.kernel_size == 7
  with pytest.raises(ValueError, match="use_grn"):
    convnext.ConvNeXtConfig.from_dict({"use_grn": True})
  with pytest.raises(ValueError, match="NHWC"):
    jax.eval_shape(convnext.ConvNeXt(cfg).init, jax.random.key(0), jnp.zeros((1, 3, 64, 64)))


def test_stochastic_depth_is_per_sample_drop_path():
  cfg = convnext.ConvNeXtConfig(**TINY)
  block = convnext.ConvNeXtBlock(8, 0.5, cfg)
  x = jax.random.normal(jax.random.key(0), (16, 5, 5, 8))
  params = {"params": _random_params(block, x)}
  det = block.apply(params, x) - x
  sto = block.apply(params, x, False, rngs={"dropout": jax.random.key(2)}) - x
  kept = np.asarray(jnp.all(jnp.abs(sto - det / 0.5) < 1e-5, axis=(1, 2, 3)))
  dropped = np.asarray(jnp.all(sto == 0, axis=(1, 2, 3)))
  assert np.all(kept ^ dropped) and kept.any() and dropped.any()
  with pytest.raises(flax.errors.InvalidRngError):  # training mode needs a dropout rng
    block.apply(params, x, False)


@pytest.mark.slow  # ~70 s on 2 cores
def test_remat_and_drop_path_rates(highest_precision):
  cfg = convnext.ConvNeXtConfig(**TINY, drop_path_rate=0.3)
  assert cfg.drop_path_rates()[0] == [0.0] and abs(cfg.drop_path_rates()[3][0] - 0.3) < 1e-9
  x = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
  params = _random_params(convnext.ConvNeXt(cfg), x)

  def loss(p, c):
    maps = convnext.ConvNeXt(c).apply({"params": p}, x, False, rngs={"dropout": jax.random.key(3)})
    return sum(jnp.sum(m ** 2) for m in maps)
  l1, g1 = jax.value_and_grad(loss)(params, cfg)
  l2, g2 = jax.value_and_grad(loss)(params, dataclasses.replace(cfg, remat=True))
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_mlp_row_chunks_match_unchunked(highest_precision):
  """The memory-bounded MLP (lax.map over row chunks) gives the unchunked numbers and grads."""
  cfg = convnext.ConvNeXtConfig(**TINY, mlp_chunk_bytes=0)
  chunked = dataclasses.replace(cfg, mlp_chunk_bytes=4 * 2 * 16 * 32 * 4)  # stage 0: 4 chunks
  assert convnext._mlp_chunks((2, 16, 16, 8), 32, chunked.mlp_chunk_bytes) == 4
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  params = _random_params(convnext.ConvNeXt(cfg), x)

  def loss(p, c):
    return sum(jnp.sum(jnp.sin(m)) for m in convnext.ConvNeXt(c).apply({"params": p}, x))
  (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, c)
                        for c in (cfg, chunked))
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_params_carry_logical_axes():
  cfg = convnext.ConvNeXtConfig(**TINY)
  boxed = jax.eval_shape(convnext.ConvNeXt(cfg).init, jax.random.key(0),
                         jnp.zeros((1, 64, 64, 3)))["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda l: hasattr(l, "names"))
  assert leaves and all(hasattr(l, "names") and len(l.names) == l.value.ndim for l in leaves)


def test_projector_and_fusion_match_torch(highest_precision):
  torch.manual_seed(0)
  ref = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.GELU(), torch.nn.Linear(40, 40))
  sd = {f"mm_projector.{k}": v for k, v in testing.torch_to_numpy_state(ref).items()}
  params = proj_convert.to_flax(sd)
  back = proj_convert.to_torch(params)
  assert back.keys() == sd.keys() and all(np.array_equal(back[k], sd[k]) for k in sd)
  rng = np.random.default_rng(0)
  clip_tok = rng.standard_normal((2, 12, 16)).astype(np.float32)
  cx_map = rng.standard_normal((2, 32, 3, 4)).astype(np.float32)  # torch NCHW, h=3, w=4
  with torch.no_grad():
    t_map = torch.from_numpy(cx_map)
    b, c, h, w = t_map.shape
    fused_t = torch.cat((torch.from_numpy(clip_tok), t_map.view(b, c, h * w).transpose(1, 2)), -1)
    want = ref(fused_t).numpy()
  fused = projector.fuse_image_tokens(jnp.asarray(clip_tok), jnp.asarray(cx_map.transpose(0, 2, 3, 1)))
  np.testing.assert_array_equal(fused, fused_t.numpy())
  got = projector.MLP2xGELU(40).apply({"params": params}, fused)
  testing.assert_close_to_scale(got, want, TOL, "mm_projector")
  with pytest.raises(ValueError, match="one position per token"):
    projector.fuse_image_tokens(jnp.asarray(clip_tok), jnp.zeros((2, 4, 4, 32)))


def test_training_step_frozen_vs_unfrozen():
  """Both towers + projector: grads reach every used parameter; frozen ones stay identical."""
  clip_cfg = clip_vit.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=7)
  cx_cfg = convnext.ConvNeXtConfig(**TINY, drop_path_rate=0.1)
  towers = {"clip": clip_vit.CLIPVisionTower(clip_cfg), "convnext": convnext.ConvNeXt(cx_cfg),
            "proj": projector.MLP2xGELU(24)}
  px = jax.random.normal(jax.random.key(0), (2, 28, 28, 3))
  px_aux = jax.random.normal(jax.random.key(1), (2, 128, 128, 3))  # last map 4x4 = 16 tokens
  params = {"clip": _random_params(towers["clip"], px, seed=1),
            "convnext": _random_params(towers["convnext"], px_aux, seed=2),
            "proj": _random_params(towers["proj"], jnp.zeros((1, 16, 16 + 32)), seed=3)}
  target = jax.random.normal(jax.random.key(3), (2, 16, 24))

  def loss_fn(p, rng):
    feats = towers["clip"].apply({"params": p["clip"]}, px)
    maps = towers["convnext"].apply({"params": p["convnext"]}, px_aux, False, rngs={"dropout": rng})
    out = towers["proj"].apply({"params": p["proj"]}, projector.fuse_image_tokens(feats, maps[-1]))
    return jnp.mean((out - target) ** 2)

  grads = jax.jit(jax.grad(loss_fn))(params, jax.random.key(4))
  flat = mapping.flatten(grads)
  unused = {p for p in flat if p.startswith("clip/layers_1/") or p.startswith("clip/post_layernorm/")}
  for p, g in flat.items():
    assert np.any(np.asarray(g)) != (p in unused), f"gradient of {p}"

  for frozen in (("clip", "convnext"), ()):
    labels = {name: jax.tree_util.tree_map(lambda _, f=name in frozen: "frozen" if f else "train", sub)
              for name, sub in params.items()}
    tx = optax.multi_transform({"train": optax.adam(1e-2), "frozen": optax.set_to_zero()}, labels)
    opt_state = tx.init(params)
    updates, _ = tx.update(grads, opt_state, params)
    new = mapping.flatten(optax.apply_updates(params, updates))
    old = mapping.flatten(params)
    for p in old:
      same = np.array_equal(np.asarray(new[p]), np.asarray(old[p]))
      should_move = p.split("/")[0] not in frozen and p not in unused
      assert same != should_move, (frozen, p)


def test_golden_convnext_aux_passes(golden_dir):
  from chatrex_jax.tools import check_equivalence
  out = io.StringIO()
  ok = check_equivalence.check(golden_dir / "convnext_aux", out=out)
  assert ok, out.getvalue()
  assert "PASS convnext_aux" in out.getvalue()
