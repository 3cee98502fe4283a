"""Swin blocks and patch merging equal timm's (PyTorch) with converted weights; the window
index and shift mask equal timm's buffers. Padding to window multiples (where the detection
Swin differs from timm's classification Swin) is covered by the golden upn_tiny fixture
(stage 3 is 4x4 with window 7; the batch2 case has odd sizes)."""
import jax
import numpy as np
import pytest
from timm.models import swin_transformer as ts
import torch

from chatrex_jax.convert import mapping
from chatrex_jax.convert.upn import swin_rules
from chatrex_jax.models.upn.swin import (
  PatchMerging,
  SwinBlock,
  SwinConfig,
  SwinTransformer,
  relative_position_index,
  shift_attention_mask,
)


def randomize(module, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=g))
  return module.eval()


def block_params(state):
  rules = [r for r in swin_rules(SwinConfig(16, (1,), (2,), 7), torch_prefix="", flax_prefix="")
           if r.torch_key.startswith("layers.0.blocks.0.")]
  rules = [mapping.Rule(r.torch_key[len("layers.0.blocks.0."):], r.flax_path.split("/", 2)[2], r.layout)
           for r in rules]
  return mapping.to_flax(state, rules, ignore=("*relative_position_index", "*attn_mask"))


@pytest.mark.parametrize("shift", [0, 3])
def test_block_matches_timm(shift, highest_precision):
  dim, heads, window, res = 16, 2, 7, 14
  ref = randomize(ts.SwinTransformerBlock(dim, (res, res), heads, window_size=window, shift_size=shift,
                                          always_partition=True), seed=shift)
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  x = np.random.default_rng(shift).standard_normal((2, res, res, dim)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  got = SwinBlock(dim, heads, window, shift).apply({"params": block_params(state)}, x)
  err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
  assert err <= 1e-5, err


def test_patch_merging_matches_timm(highest_precision):
  ref = randomize(ts.PatchMerging(8), seed=3)
  x = np.random.default_rng(0).standard_normal((1, 6, 10, 8)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  params = {"norm": {"scale": ref.norm.weight.detach().numpy(), "bias": ref.norm.bias.detach().numpy()},
            "reduction": {"kernel": ref.reduction.weight.detach().numpy().T}}
  got = np.asarray(PatchMerging().apply({"params": params}, x))
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_buffers_match_timm():
  blk = ts.SwinTransformerBlock(8, (14, 14), 2, window_size=7, shift_size=3, always_partition=True)
  np.testing.assert_array_equal(relative_position_index(7), blk.attn.relative_position_index.numpy())
  np.testing.assert_array_equal(shift_attention_mask(14, 14, 7, 3), blk.attn_mask.numpy())


def test_stage_shapes_and_odd_sizes():
  cfg = SwinConfig(16, (1, 1, 1, 1), (1, 2, 4, 8), 7)
  model = SwinTransformer(cfg)
  x = np.zeros((1, 61, 45, 3), np.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  outs = jax.eval_shape(model.apply, params, x)
  assert [o.shape for o in outs] == [(1, 16, 12, 16), (1, 8, 6, 32), (1, 4, 3, 64), (1, 2, 2, 128)]
  with pytest.raises(ValueError, match="NHWC"):
    model.apply(params, np.zeros((1, 3, 32, 32), np.float32))
