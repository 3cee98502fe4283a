"""UPN end to end: golden fixtures through check_equivalence, converter round trips and errors,
prompt handling, batching, preprocessing, filtering and the predict-upn CLI."""
from contextlib import redirect_stdout
import dataclasses
import io
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import torch

from chatrex_jax.convert import mapping, safetensors_io, torch_files
from chatrex_jax.convert import upn as convert_upn
from chatrex_jax.inference import upn as infer
from chatrex_jax.models.upn.swin import SwinConfig
from chatrex_jax.models.upn.upn import UPN, UPNConfig
from chatrex_jax.ops import ms_deform_attn as ms_deform_attn_module
from chatrex_jax.tools import check_equivalence

TINY = UPNConfig(swin=SwinConfig(16, (2, 2, 2, 2), (1, 2, 4, 8), 7), d_model=32, d_ffn=64,
                 enc_layers=6, dec_layers=6, num_queries=10)   # upn_large's layer counts, tiny widths
SMALL = dataclasses.replace(TINY, swin=SwinConfig(16, (1, 1, 1, 1), (1, 2, 4, 8), 7), enc_layers=1,
                            dec_layers=1)                      # for running the model quickly


def random_params(config, seed=0):
  """Random values of the model's parameter shapes (traced, not run: fast)."""
  shapes = nn.meta.unbox(convert_upn.abstract_params(config))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _check(golden_dir, name):
  out = io.StringIO()
  ok = check_equivalence.check(golden_dir / name, out=out)
  text = out.getvalue()
  assert ok, text
  return text


@pytest.fixture(params=["one pass", "blocks"])
def deform_path(request, monkeypatch):
  """Each deformable-attention path of `ops.ms_deform_attn`: the tiny fixtures have few queries,
  so `blocks` lowers the one-pass limit to zero."""
  if request.param == "blocks":
    monkeypatch.setattr(ms_deform_attn_module, "SINGLE_PASS_QUERIES", 0)
  jax.clear_caches()  # the limit is read while tracing: no trace of the other path may be reused
  yield request.param
  jax.clear_caches()


def test_golden_msdeform_attn(golden_dir, deform_path):
  _check(golden_dir, "msdeform_attn")


def test_golden_upn_filter_reports_official_early_return(golden_dir):
  text = _check(golden_dir, "upn_filter")
  assert "early-return" in text and "PASS upn_filter" in text


@pytest.mark.slow
def test_golden_upn_tiny(golden_dir, deform_path):
  _check(golden_dir, "upn_tiny")


@pytest.mark.slow
def test_golden_upn_wrapper_e2e(golden_dir, deform_path):
  _check(golden_dir, "upn_wrapper_e2e")


def _fixture_copy(golden_dir, tmp_path, name, filter_args):
  """A copy of a golden fixture whose meta.json `filter_args` is replaced (None: removed)."""
  import shutil

  from chatrex_jax.tools.equivalence.registry import Fixture
  dst = tmp_path / name
  shutil.copytree(golden_dir / name, dst)
  meta = json.loads((dst / "meta.json").read_text())
  meta.pop("filter_args", None)
  if filter_args is not None:
    meta["filter_args"] = filter_args
  (dst / "meta.json").write_text(json.dumps(meta))
  return Fixture(dst)


@pytest.mark.parametrize("name", ["upn_filter", "upn_wrapper_e2e"])
def test_filter_fixtures_take_filter_args_from_meta(golden_dir, tmp_path, name):
  from chatrex_jax.tools.equivalence import upn as upn_runners
  fx = _fixture_copy(golden_dir, tmp_path, name, {"min_score": 0.55, "nms_value": 0.6})
  assert upn_runners.filter_args(fx) == (0.55, 0.6)
  fx = _fixture_copy(golden_dir, tmp_path / "without", name, None)
  assert upn_runners.filter_args(fx) == (0.3, 0.8)  # UPNWrapper.filter's defaults as fallback


def test_upn_filter_runner_uses_meta_filter_args(golden_dir, tmp_path, monkeypatch):
  from chatrex_jax.tools.equivalence import upn as upn_runners
  fx = _fixture_copy(golden_dir, tmp_path, "upn_filter", {"min_score": 0.55, "nms_value": 0.6})
  calls = []
  real = infer.filter_result

  def spy(result, min_score, nms_iou):
    calls.append((min_score, nms_iou))
    return real(result, min_score, nms_iou)

  monkeypatch.setattr(infer, "filter_result", spy)
  got = upn_runners.run_upn_filter(fx).outputs
  assert calls and all(c == (0.55, 0.6) for c in calls)
  # A stricter threshold keeps fewer boxes than the fixture's 0.3: the values really take effect.
  for case in ("case0", "case1"):
    res = infer.UPNResult(fx.inputs[f"{case}_boxes"], fx.inputs[f"{case}_scores"][..., 0])
    want = [len(k.boxes) for k in real(res, 0.55, 0.6)]
    n = next((i for i, c in enumerate(want) if c == 0), len(want))
    assert got[f"{case}_counts"].tolist() == want[:n]
  assert got["case0_counts"].sum() < fx.outputs["case0_counts"].sum()


# ----------------------------------------------------------------------------- converter
@pytest.fixture(scope="module")
def tiny_state():
  """A random torch-layout state dict with the key set of upn_large.pth (tiny widths)."""
  params = random_params(TINY)
  return params, convert_upn.to_torch(params, TINY)


def test_key_layout_like_upn_large(tiny_state):
  _, state = tiny_state
  bbox = [k for k in state if k.endswith("layers.0.weight") and "bbox_embed." in k and "enc_out" not in k]
  assert len(bbox) == 12  # the shared box MLP under 12 names
  assert state["backbone.model.backbone.layers.0.blocks.0.attn.relative_position_index"].dtype == np.int64
  assert state["transformer.decoder.layers.0.self_attn.in_proj_weight"].shape == (96, 32)
  assert state["input_proj.4.0.weight"].shape == (32, 128, 3, 3)
  mapping.check_bijective(convert_upn.rules(TINY))


def test_round_trip_bit_identical(tiny_state, tmp_path):
  params, state = tiny_state
  back, report = convert_upn.to_flax(state, TINY)
  assert report.unexpected == [] and report.missing_aliases == []
  state2 = convert_upn.to_torch(back, TINY)
  assert state2.keys() == state.keys()
  for k in state:
    assert state2[k].dtype == state[k].dtype and np.array_equal(state2[k], state[k]), k
  # .pth (weights_only) and .safetensors files read back to the same tensors
  torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}, "epoch": 3}, tmp_path / "u.pth")
  safetensors_io.save_file(state, tmp_path / "u.safetensors")
  for f in ("u.pth", "u.safetensors"):
    loaded = torch_files.load_state_dict(tmp_path / f)
    assert loaded.keys() == state.keys()
    assert all(np.array_equal(loaded[k], state[k]) for k in state)


def test_non_strict_extras_and_missing_aliases_are_reported(tiny_state):
  _, state = tiny_state
  s = dict(state)
  s["transformer.label_enc.weight"] = np.zeros((3, 3), np.float32)
  del s["transformer.decoder.bbox_embed.5.layers.2.bias"]
  _, report = convert_upn.to_flax(s, TINY, strict=False, check_shapes=False)
  assert report.unexpected == ["transformer.label_enc.weight"]
  assert report.missing_aliases == ["transformer.decoder.bbox_embed.5.layers.2.bias"]


def test_conversion_errors_are_collected(tiny_state):
  _, state = tiny_state
  s = dict(state)
  s["bbox_embed.3.layers.1.weight"] = s["bbox_embed.3.layers.1.weight"] + 1   # alias disagrees
  del s["transformer.tgt_embed.weight"]                                        # missing
  s["transformer.level_embed"] = np.zeros((4, 32), np.float32)                  # mis-shaped
  with pytest.raises(mapping.ConversionError) as e:
    convert_upn.to_flax(s, TINY)
  msg = str(e.value)
  assert "bbox_embed.3.layers.1.weight differs" in msg
  assert "transformer.tgt_embed.weight" in msg and "transformer.level_embed" in msg
  s = dict(state)
  s["backbone.model.backbone.layers.1.blocks.0.attn.relative_position_index"] = np.zeros((49, 49), np.int64)
  with pytest.raises(mapping.ConversionError, match="relative_position_index"):
    convert_upn.to_flax(s, TINY, check_shapes=False)


def test_release_file_extras_and_unused_parameters(tiny_state, tmp_path, highest_precision):
  """upn_large.pth as released may carry training entries besides ckpt["model"] and lack the
  `ref_point_head_point` weights (the decoder multiplies them by 0): the load reports both,
  once, and gives the same network; a parameter the forward reads still fails by name."""
  params, state = tiny_state
  unused = sorted(k for k in state if ".ref_point_head_point." in k)
  assert len(unused) == 4
  kept = {k: torch.from_numpy(v) for k, v in state.items() if k not in unused}
  torch.save({"model": kept, "optimizer": {"lr": 1e-4}, "epoch": 12}, tmp_path / "upn.pth")
  loaded, report = convert_upn.load(tmp_path / "upn.pth", TINY)
  assert sorted(report.filled) == unused and report.extras == ["epoch", "optimizer"]
  assert "zero-filled" in str(report) and "optimizer" in str(report)
  image = np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype(np.float32)
  model = UPN(TINY)
  want = infer.forward(model, params, image, None, ("fine",))["fine"]
  got = infer.forward(model, loaded, image, None, ("fine",))["fine"]
  np.testing.assert_array_equal(got["pred_boxes"], want["pred_boxes"])
  np.testing.assert_array_equal(got["pred_logits"], want["pred_logits"])
  del kept["transformer.decoder.norm.weight"], kept["transformer.enc_output.bias"]
  torch.save({"model": kept}, tmp_path / "broken.pth")
  with pytest.raises(mapping.ConversionError) as e:
    convert_upn.load(tmp_path / "broken.pth", TINY)
  assert "transformer.decoder.norm.weight" in str(e.value) and "transformer.enc_output.bias" in str(e.value)


def test_pickled_training_args_are_refused_unless_allowed(tiny_state, tmp_path):
  import argparse
  _, state = tiny_state
  ckpt = {"model": {k: torch.from_numpy(v) for k, v in state.items()},
          "args": argparse.Namespace(lr=1e-4, epochs=12)}
  torch.save(ckpt, tmp_path / "with_args.pth")
  with pytest.raises(mapping.ConversionError, match="argparse.Namespace"):
    torch_files.read_checkpoint(tmp_path / "with_args.pth")
  loaded, extras = torch_files.read_checkpoint(tmp_path / "with_args.pth", safe_globals=["argparse.Namespace"])
  assert extras == ["args"] and loaded.keys() == state.keys()


def test_params_carry_logical_axis_names():
  boxed = jax.eval_shape(lambda: UPN(TINY).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), None, "fine"))
  leaves = jax.tree_util.tree_leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  assert all(len(x.names) == x.value.ndim for x in leaves)


# ----------------------------------------------------------------------------- model behaviour
@pytest.fixture(scope="module")
def tiny_model():
  return UPN(SMALL), random_params(SMALL, seed=1)


def test_prompts_and_batching(tiny_model, highest_precision):
  model, params = tiny_model
  rng = np.random.default_rng(0)
  imgs = rng.standard_normal((2, 48, 56, 3)).astype(np.float32)
  out = infer.forward(model, params, imgs, None, ("fine", "coarse", "universal"))
  fine, coarse, zero = out["fine"], out["coarse"], out["universal"]
  assert np.all(zero["pred_logits"] == 0)                # any other string: zero prompt
  assert not np.allclose(fine["pred_logits"], coarse["pred_logits"])
  assert fine["pred_boxes"].shape == (2, 10, 4)
  assert np.isfinite(fine["pred_boxes"]).all() and np.isfinite(fine["pred_logits"]).all()
  # same-size images: a batch equals one-at-a-time runs
  for b in range(2):
    one = infer.forward(model, params, imgs[b:b + 1], None, ("fine",))["fine"]
    np.testing.assert_allclose(one["pred_boxes"][0], fine["pred_boxes"][b], atol=1e-5)
    np.testing.assert_allclose(one["pred_logits"][0], fine["pred_logits"][b], atol=1e-4)
  # a padded image: mask flows to valid ratios; results differ from a single run only through
  # Swin's unmasked padding (documented), and stay finite
  full = infer.forward(model, params, np.pad(imgs[:1], ((0, 0), (0, 16), (0, 0), (0, 0))),
                       np.pad(np.zeros((1, 48, 56), bool), ((0, 0), (0, 16), (0, 0)), constant_values=True),
                       ("fine",), full=True)
  np.testing.assert_allclose(full["valid_ratios"][0, 0], [1.0, 48 / 64])
  assert np.isfinite(full["fine"]["pred_boxes"]).all()


def test_encoder_through_blocks_equals_one_pass(tiny_model, monkeypatch, highest_precision):
  """The UPN's deformable attention through the blocked path (the real sizes take it: the
  encoder's every token is a query) gives the one-pass outputs; the goldens run both in -m slow."""
  model, params = tiny_model
  imgs = np.random.default_rng(3).standard_normal((2, 48, 56, 3)).astype(np.float32)
  def run(limit):
    monkeypatch.setattr(ms_deform_attn_module, "SINGLE_PASS_QUERIES", limit)
    jax.clear_caches()  # the limit is read while tracing
    return infer.forward(model, params, imgs, None, ("fine",))["fine"]
  one_pass, blocks = run(10**9), run(0)
  jax.clear_caches()
  np.testing.assert_allclose(blocks["pred_boxes"], one_pass["pred_boxes"], atol=1e-5)
  np.testing.assert_allclose(blocks["pred_logits"], one_pass["pred_logits"], atol=1e-5)


def test_resize_rule_and_preprocess():
  assert infer.resize_size(1920, 1080) == (750, 1333)
  assert infer.resize_size(326, 231) == (800, 1129)
  assert infer.resize_size(800, 1000) == (1000, 800)     # short side already 800: unchanged
  assert infer.resize_size(1000, 500) == (666, 1332)     # round(666.5) = 666, then truncation
  gray = Image.fromarray(np.arange(30 * 20, dtype=np.uint8).reshape(30, 20), "L")
  x, hw = infer.preprocess(gray, 40, 100)                # converted to RGB
  assert hw == (30, 20) and x.shape == (60, 40, 3) and x.dtype == np.float32


def test_postprocess_and_filter_every_image():
  boxes = np.array([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.2, 0.3, 0.3]]] * 2, np.float32)
  logits = np.array([[[2.0], [-1.0]], [[-5.0], [-6.0]]], np.float32)
  res = infer.postprocess(boxes, logits, [(100, 200), (10, 10)])
  np.testing.assert_allclose(res.boxes[0, 0], [80, 30, 120, 70], atol=1e-4)
  assert res.scores[0, 0] > res.scores[0, 1]
  kept = infer.filter_result(res, 0.3, 0.8)
  assert len(kept) == 2 and len(kept[1].boxes) == 0     # no early return
  assert kept[0].boxes.dtype == np.int32 and kept[0].scores.tolist() == [np.float32(0.88)]


def test_predict_upn_cli(golden_dir, tmp_path):
  from chatrex_jax.inference import upn_predict
  img = tmp_path / "in.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(img)
  out = tmp_path / "out.png"
  buf = io.StringIO()
  with redirect_stdout(buf):
    rc = upn_predict.main(["--upn", str(golden_dir / "upn_tiny" / "weights.safetensors"), "--image", str(img),
                           "--config", "tiny", "--prompt-type", "coarse", "--min-score", "0.0",
                           "--short-side", "64", "--max-size", "100", "--out", str(out)])
  assert rc == 0
  res = json.loads(buf.getvalue().strip().splitlines()[-1])
  assert len(res["boxes"]) == len(res["scores"]) > 0
  assert Image.open(out).size == (70, 50)
