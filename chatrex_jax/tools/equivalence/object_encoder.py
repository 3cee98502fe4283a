"""Golden runners: torchvision `roi_align` and RexSeek `MultiLevelROIVisualPrompt` (docs/architecture.md B.6).

Fixtures are NCHW (torch); the project is NHWC, so maps are transposed on the way in and the
RoI outputs [K, Ph, Pw, C] back to [K, C, Ph, Pw]. Neither component has parameters (no weights
file, nothing to convert).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from chatrex_jax.models.object_encoder import MultiLevelRoIEncoder
from chatrex_jax.ops.roi_align import required_sampling_grid, roi_align
from chatrex_jax.tools.equivalence.registry import Fixture, RunResult, register


def _nhwc(x: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 2, 3, 1)))


@register("roi_align")
def run_roi_align(fixture: Fixture) -> RunResult:
  cfg = fixture.config
  feats = fixture.inputs["input"]
  rois = fixture.inputs["rois"]
  size = max(feats.shape[2:])
  # Exact for every fixture box: size the static grid bound from the boxes themselves.
  bound = max(required_sampling_grid(rois, cfg["output_size"], cfg["spatial_scale"],
                                     cfg.get("aligned", False)), 1)
  out = roi_align(_nhwc(feats), jnp.asarray(rois), cfg["output_size"], cfg["spatial_scale"],
                  cfg.get("sampling_ratio", -1), cfg.get("aligned", False),
                  max_sampling_grid=max(bound, size), grid_overflow="nan")
  return RunResult(outputs={"output": np.asarray(out).transpose(0, 3, 1, 2)})


@register("multi_level_roi")
def run_multi_level_roi(fixture: Fixture) -> RunResult:
  cfg = fixture.config
  names = sorted((k for k in fixture.inputs if k.startswith("feature_level")),
                 key=lambda k: int(k.removeprefix("feature_level")))
  feats = [_nhwc(fixture.inputs[k]) for k in names]
  channels = [f.shape[-1] for f in feats]
  if channels != list(cfg["channel_per_level"]):
    raise ValueError(f"fixture maps have channels {channels}, config {cfg['channel_per_level']}")
  if cfg.get("add_pos_embedding", True) and cfg["pos_embedding_dim"] != sum(channels):
    raise ValueError("pos_embedding_dim must equal the summed channels (they are added)")
  boxes = jnp.asarray(fixture.inputs["boxes"], jnp.float32)[None]            # [1, K, 4]
  mask = jnp.ones(boxes.shape[:2], bool)
  outputs = {}
  for name, pos in (("output", cfg.get("add_pos_embedding", True)),
                    ("output_without_pos_embedding", False)):
    enc = MultiLevelRoIEncoder(output_size=cfg["output_size"],
                               spatial_scale=cfg["spatail_scale"],  # official typo
                               add_pos_embedding=pos, grid_overflow="nan")
    outputs[name] = np.asarray(enc.apply({}, feats, boxes, mask))
  return RunResult(outputs={k: v for k, v in outputs.items() if k in fixture.outputs})


# ---------------------------------------------------------------------------------------------
# The official composition in PyTorch, for live tests and benchmarks (torch imported lazily).
# ---------------------------------------------------------------------------------------------
def torch_gen_sineembed_for_position(pos_tensor, dim_of_pos_feats: int):
  """RexSeek `pos_embed_util.gen_sineembed_for_position` (cxcywh [B, N, 4] -> y, x, w, h)."""
  import math

  import torch
  scale = 2 * math.pi
  dim_t = torch.arange(dim_of_pos_feats, dtype=torch.float32, device=pos_tensor.device)
  dim_t = 10000 ** (2 * (dim_t // 2) / dim_of_pos_feats)

  def embed(v):
    p = (v * scale)[:, :, None] / dim_t
    return torch.stack((p[:, :, 0::2].sin(), p[:, :, 1::2].cos()), dim=3).flatten(2)

  return torch.cat([embed(pos_tensor[:, :, i]) for i in (1, 0, 2, 3)], dim=2)


def torch_multi_level_roi(features_nchw, boxes_xyxy, output_size: int = 7,
                          spatial_scale: float = 0.25, add_pos_embedding: bool = True):
  """RexSeek `MultiLevelROIVisualPrompt.__call__` for one image, written out in torch.

  features_nchw: list of [1, C_k, H_k, W_k] torch tensors; boxes_xyxy: [K, 4] torch float
  (not mutated). returns: [1, K, sum C_k].
  """
  import torch
  import torch.nn.functional as F
  from torchvision.ops import roi_align as tv_roi_align
  max_h = max(f.shape[2] for f in features_nchw)
  max_w = max(f.shape[3] for f in features_nchw)
  levels = [f.float() if k == 0 else
            F.interpolate(f.float(), size=(max_h, max_w), mode="bilinear", align_corners=False)
            for k, f in enumerate(features_nchw)]
  feat = torch.cat(levels, dim=1)
  del levels
  out = tv_roi_align(feat, [boxes_xyxy.float()], output_size=output_size,
                     spatial_scale=spatial_scale)
  del feat
  out = out.mean(dim=(2, 3)).reshape(1, out.shape[0], out.shape[1])
  if add_pos_embedding:
    b = boxes_xyxy.clone().to(out.dtype)
    b[:, [0, 2]] = b[:, [0, 2]] / (max_w / spatial_scale)
    b[:, [1, 3]] = b[:, [1, 3]] / (max_h / spatial_scale)
    b[:, 2] = b[:, 2] - b[:, 0]
    b[:, 3] = b[:, 3] - b[:, 1]
    b[:, 0] = b[:, 0] + b[:, 2] / 2
    b[:, 1] = b[:, 1] + b[:, 3] / 2
    out = out + torch_gen_sineembed_for_position(b.unsqueeze(0), out.shape[-1] // 4)
  return out
