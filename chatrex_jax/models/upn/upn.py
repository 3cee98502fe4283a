"""UPN (Universal Proposal Network): Swin + 5-level deformable DETR with fine/coarse prompts.

Forward (docs/architecture.md A.2-A.9), B batch, S tokens of all levels, Q queries, D model width:
  images [B, H, W, 3] NHWC, ImageNet-normalised; mask [B, H, W] bool, True on padding
  -> Swin stage maps (strides 4..32) -> input_proj (1x1 conv + GroupNorm(32)) for levels 0-3,
     a 3x3/stride-2 conv + GroupNorm on the raw stage-3 map for level 4
  -> sine position maps (temperature 20, y first) + level_embed, flattened level-major
  -> deformable encoder -> two-stage proposals scored by a dot product with the chosen prompt
     (`fine_grained_prompt` / `coarse_grained_prompt`, anything else = zero prompt), top-Q
  -> deformable decoder from the learned `tgt_embed` queries with iterative refinement by the
     shared box MLP -> logits (dot product with the prompt) and cxcywh boxes (unclipped).

`encode` (prompt independent) and `decode` are separate methods so both prompts can reuse one
encoder pass; `__call__` runs both. Outputs are dicts of named arrays (intermediates included,
in the order and layout of the golden fixtures).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from chatrex_jax.models.upn.deformable import MLP, dense, layer_norm
from chatrex_jax.models.upn.swin import SWIN_VARIANTS, SwinConfig, SwinTransformer
from chatrex_jax.models.upn.transformer import Decoder, Encoder, encoder_output_proposals, exact_divide, inverse_sigmoid
from chatrex_jax.ops.ms_deform_attn import level_start_index
from chatrex_jax.ops.position import sine_position_map

PROMPT_TYPES = {"fine": "fine_grained_prompt", "fine_grained_prompt": "fine_grained_prompt",
                "coarse": "coarse_grained_prompt", "coarse_grained_prompt": "coarse_grained_prompt"}


@dataclasses.dataclass(frozen=True)
class UPNConfig:
  """UPN hyper-parameters; defaults are `configs/upn_large.py` of the official repo."""
  swin: SwinConfig = SWIN_VARIANTS["swin_L_384_22k"]
  d_model: int = 256
  d_ffn: int = 2048
  n_heads: int = 8
  n_points: int = 4
  num_feature_levels: int = 5
  enc_layers: int = 6
  dec_layers: int = 6
  num_queries: int = 900
  pos_temperature: float = 20.0
  backbone_dtype: Any = jnp.float32   # Swin compute dtype (bf16 on accelerators); the rest is fp32

  @classmethod
  def from_config_dict(cls, model) -> "UPNConfig":
    """From the `model` section of chatrex_jax/configs/upn_*.py (ml_collections or dict)."""
    d = dict(model)
    swin = SwinConfig.from_official(dict(d.pop("swin")))
    dtype = d.pop("backbone_dtype", "float32")
    return cls(swin=swin, backbone_dtype=jnp.dtype(dtype), **d)

  @classmethod
  def from_official(cls, model_cfg: dict) -> "UPNConfig":
    """From the official mmengine-style `model` dict (e.g. the upn_tiny fixture's config)."""
    vb = model_cfg["vision_backbone_cfg"]
    bb = vb["backbone_cfg"]
    swin = SWIN_VARIANTS[bb] if isinstance(bb, str) else SwinConfig.from_official(bb)
    tc = model_cfg["transformer_cfg"]
    enc, dec = tc["encoder_cfg"], tc["decoder_cfg"]
    el, dl = enc["encoder_layer_cfg"], dec["decoder_layer_cfg"]
    for key, want in (("activation", "relu"),):
      if el.get(key, want) != want or dl.get(key, want) != want:
        raise ValueError(f"unsupported {key}: UPN uses {want}")
    if tc.get("two_stage_type", "standard") != "standard":
      raise ValueError("only two_stage_type='standard' is supported")
    pe = vb.get("position_embedding_cfg", {})
    d = tc.get("d_model", 256)
    if pe.get("num_pos_feats", d // 2) * 2 != d:
      raise ValueError(f"position embedding num_pos_feats {pe['num_pos_feats']} != d_model/2")
    if pe.get("temperatureH", 20) != pe.get("temperatureW", 20):
      raise ValueError("temperatureH != temperatureW is not supported")
    return cls(swin=swin, d_model=d, d_ffn=el.get("d_ffn", 2048), n_heads=el.get("n_heads", 8),
               n_points=el.get("n_points", 4), num_feature_levels=tc.get("num_feature_levels", 5),
               enc_layers=enc["num_layers"], dec_layers=dec["num_layers"],
               num_queries=tc.get("num_queries", model_cfg.get("num_queries", 900)),
               pos_temperature=float(pe.get("temperatureH", 20)))


def nearest_mask(mask: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """PyTorch legacy 'nearest' resize of a [B, H, W] bool mask: src = floor(dst * in / out)."""
  _, h, w = mask.shape
  oh, ow = size
  iy = np.minimum(np.floor(np.arange(oh, dtype=np.float32) * np.float32(h / oh)).astype(np.int64), h - 1)
  ix = np.minimum(np.floor(np.arange(ow, dtype=np.float32) * np.float32(w / ow)).astype(np.int64), w - 1)
  return mask[:, iy][:, :, ix]


def valid_ratio(mask: jnp.ndarray) -> jnp.ndarray:
  """[B, H, W] bool (True = pad) -> [B, 2] (w, h): unmasked row 0 columns / W, column 0 rows / H."""
  _, h, w = mask.shape
  vh = jnp.sum(~mask[:, :, 0], axis=1).astype(jnp.float32)
  vw = jnp.sum(~mask[:, 0, :], axis=1).astype(jnp.float32)
  return exact_divide(jnp.stack([vw, vh], -1), jnp.asarray([w, h], jnp.float32))


class InputProj(nn.Module):
  """Conv (1x1, or 3x3 stride 2 pad 1 for the extra level) + GroupNorm(32). NHWC."""
  d_model: int
  kernel: int = 1
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    pad = (self.kernel - 1) // 2
    x = nn.Conv(self.d_model, (self.kernel, self.kernel), strides=(self.stride, self.stride),
                padding=((pad, pad), (pad, pad)), name="conv", dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                         (None, None, "conv_in", "conv_out")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))(x)
    return nn.GroupNorm(num_groups=32, epsilon=1e-5, use_fast_variance=False, name="norm", dtype=jnp.float32,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))(x)


class UPN(nn.Module):
  """The Universal Proposal Network. See the module docstring for the data flow."""
  config: UPNConfig

  def setup(self):
    cfg = self.config
    d, nl = cfg.d_model, cfg.num_feature_levels
    if nl != len(cfg.swin.out_indices) + 1:
      raise ValueError(f"num_feature_levels {nl} must be the Swin outputs + 1 extra level")
    self.backbone = SwinTransformer(cfg.swin, cfg.backbone_dtype)
    self.input_proj = [InputProj(d) for _ in range(nl - 1)] + [InputProj(d, 3, 2)]
    self.level_embed = self.param("level_embed", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), (None, "embed")), (nl, d), jnp.float32)
    self.tgt_embed = self.param("tgt_embed", nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(), (None, "embed")), (cfg.num_queries, d), jnp.float32)
    self.fine_grained_prompt = self.param("fine_grained_prompt", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), (None, "embed")), (1, d), jnp.float32)
    self.coarse_grained_prompt = self.param("coarse_grained_prompt", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), (None, "embed")), (1, d), jnp.float32)
    self.enc_output = dense(d, None, ("embed", "mlp"))
    self.enc_output_norm = layer_norm(None)
    self.enc_out_bbox_embed = MLP(d, 4, 3)
    self.bbox_embed = MLP(d, 4, 3, zero_init_last=True)
    self.encoder = Encoder(cfg.enc_layers, d, cfg.d_ffn, cfg.n_heads, nl, cfg.n_points)
    self.decoder = Decoder(cfg.dec_layers, d, cfg.d_ffn, cfg.n_heads, nl, cfg.n_points)

  def prompt(self, prompt_type: str, batch: int) -> jnp.ndarray:
    """[B, D] prompt embedding for a static prompt_type ('fine'/'coarse'/official names)."""
    name = PROMPT_TYPES.get(prompt_type)
    d = self.config.d_model
    if name == "fine_grained_prompt":
      p = jnp.asarray(self.fine_grained_prompt)[0]
    elif name == "coarse_grained_prompt":
      p = jnp.asarray(self.coarse_grained_prompt)[0]
    else:  # the official code silently uses a zero prompt for any other string
      p = jnp.zeros((d,), jnp.float32)
    return jnp.broadcast_to(p, (batch, d))

  def encode(self, images: jnp.ndarray, mask: jnp.ndarray | None = None) -> dict[str, Any]:
    """Backbone + input projections + encoder (prompt independent).

    images: [B, H, W, 3] float; mask: [B, H, W] bool (True = padding) or None (no padding).
    returns dict: backbone_feats (list of [B, H_i, W_i, C_i]), src_flatten, lvl_pos_embed_flatten,
      memory [B, S, D]; mask_flatten [B, S] bool; valid_ratios [B, L, 2] (w, h); spatial_shapes
      (static tuple of (H_l, W_l)); level_start_index (static tuple).
    """
    cfg = self.config
    b, h, w, _ = images.shape
    if mask is None:
      mask = jnp.zeros((b, h, w), bool)
    if mask.shape != (b, h, w):
      raise ValueError(f"mask shape {mask.shape} != images' {(b, h, w)}")
    mask = mask.astype(bool)
    feats = self.backbone(images)
    srcs = [proj(f.astype(jnp.float32)) for proj, f in zip(self.input_proj[:-1], feats)]
    srcs.append(self.input_proj[-1](feats[-1].astype(jnp.float32)))
    masks = [nearest_mask(mask, s.shape[1:3]) for s in srcs]
    spatial_shapes = tuple((int(s.shape[1]), int(s.shape[2])) for s in srcs)
    level_embed = jnp.asarray(self.level_embed)
    src_flat, pos_flat, mask_flat, ratios = [], [], [], []
    for lvl, (src, m) in enumerate(zip(srcs, masks)):
      pos = sine_position_map(m, cfg.d_model // 2, cfg.pos_temperature)
      src_flat.append(src.reshape(b, -1, cfg.d_model))
      pos_flat.append(pos.reshape(b, -1, cfg.d_model) + level_embed[lvl])
      mask_flat.append(m.reshape(b, -1))
      ratios.append(valid_ratio(m))
    src_flatten = jnp.concatenate(src_flat, 1)
    pos_flatten = jnp.concatenate(pos_flat, 1)
    mask_flatten = jnp.concatenate(mask_flat, 1)
    valid_ratios = jnp.stack(ratios, 1)
    memory = self.encoder(src_flatten, pos_flatten, spatial_shapes, valid_ratios, mask_flatten)
    return dict(backbone_feats=feats, src_flatten=src_flatten, lvl_pos_embed_flatten=pos_flatten,
                mask_flatten=mask_flatten, valid_ratios=valid_ratios, memory=memory,
                spatial_shapes=spatial_shapes, level_start_index=level_start_index(spatial_shapes))

  def decode(self, enc: dict[str, Any], prompt_type: str) -> dict[str, jnp.ndarray]:
    """Two-stage query selection + decoder + heads for one (static) prompt type.

    returns dict: enc_class_logits [B, S, 1], enc_topk_indices [B, Q] int32,
      enc_topk_boxes_unsigmoid [B, Q, 4], enc_topk_init_proposals_sigmoid [B, Q, 4],
      dec_hs [layers, B, Q, D], dec_references [layers+1, B, Q, 4],
      all_logits [layers, B, Q, 1], all_boxes [layers, B, Q, 4],
      pred_logits [B, Q, 1], pred_boxes [B, Q, 4] (normalised cxcywh, unclipped).
    """
    cfg = self.config
    memory, mask_flatten = enc["memory"], enc["mask_flatten"]
    spatial_shapes, valid_ratios = enc["spatial_shapes"], enc["valid_ratios"]
    b = memory.shape[0]
    if cfg.num_queries > memory.shape[1]:
      raise ValueError(f"num_queries {cfg.num_queries} > {memory.shape[1]} encoder tokens: the image "
                       "is too small for this model")
    prompt = self.prompt(prompt_type, b)                                     # [B, D]
    out_mem, proposals = encoder_output_proposals(memory, mask_flatten, spatial_shapes)
    out_mem = self.enc_output_norm(self.enc_output(out_mem))
    enc_logits = jnp.einsum("bsd,bd->bs", out_mem, prompt)[..., None]      # [B, S, 1]
    coords = self.enc_out_bbox_embed(out_mem) + proposals                  # inf stays inf
    _, topk = jax.lax.top_k(jnp.max(enc_logits, -1), cfg.num_queries)       # descending
    refpoints = jax.lax.stop_gradient(jnp.take_along_axis(coords, topk[..., None], axis=1))
    init_props = jax.nn.sigmoid(jnp.take_along_axis(proposals, topk[..., None], axis=1))
    tgt = jnp.broadcast_to(jnp.asarray(self.tgt_embed)[None], (b, cfg.num_queries, cfg.d_model))
    hs, refs = self.decoder(tgt, memory, refpoints, spatial_shapes, valid_ratios, mask_flatten,
                            self.bbox_embed)
    all_boxes = jax.nn.sigmoid(self.bbox_embed(hs) + inverse_sigmoid(refs[:-1]))
    all_logits = jnp.einsum("lbqd,bd->lbq", hs, prompt)[..., None]
    return dict(enc_class_logits=enc_logits, enc_topk_indices=topk,
                enc_topk_boxes_unsigmoid=refpoints, enc_topk_init_proposals_sigmoid=init_props,
                dec_hs=hs, dec_references=refs, all_logits=all_logits, all_boxes=all_boxes,
                pred_logits=all_logits[-1], pred_boxes=all_boxes[-1])

  def __call__(self, images: jnp.ndarray, mask: jnp.ndarray | None = None,
               prompt_type: str = "fine_grained_prompt") -> dict[str, Any]:
    """images [B, H, W, 3], mask [B, H, W] bool or None -> encode(...) | decode(...) outputs."""
    enc = self.encode(images, mask)
    return {**enc, **self.decode(enc, prompt_type)}
