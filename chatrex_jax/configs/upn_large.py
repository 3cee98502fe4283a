"""UPN-Large (the released `upn_large.pth`): Swin-L 384 + 5-level deformable DETR, 900 queries.

  get_config()  ->  ConfigDict with a `model` section; build with
  `chatrex_jax.models.upn.upn.UPNConfig.from_config_dict(cfg.model)`.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  cfg = ml_collections.ConfigDict()
  cfg.model = ml_collections.ConfigDict(dict(
      swin=dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12,
                patch_size=4, mlp_ratio=4.0, qkv_bias=True, out_indices=(0, 1, 2, 3)),
      d_model=256, d_ffn=2048, n_heads=8, n_points=4, num_feature_levels=5, enc_layers=6,
      dec_layers=6, num_queries=900, pos_temperature=20.0, backbone_dtype="float32"))
  return cfg
