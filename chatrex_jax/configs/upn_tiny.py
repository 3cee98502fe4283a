"""The tiny UPN of the golden fixtures (upn_tiny, upn_wrapper_e2e): Swin embed 16, window 7,
d_model 64, 2 + 2 layers, 20 queries. `get_config("d32")` halves d_model for quicker tests."""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.model = ml_collections.ConfigDict(dict(
      swin=dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
                patch_size=4, mlp_ratio=4.0, qkv_bias=True, out_indices=(0, 1, 2, 3)),
      d_model=64, d_ffn=128, n_heads=8, n_points=4, num_feature_levels=5, enc_layers=2,
      dec_layers=2, num_queries=20, pos_temperature=20.0, backbone_dtype="float32"))
  if arg == "d32":
    cfg.model.d_model = 32  # GroupNorm(32) needs d_model % 32 == 0
  elif arg not in (None, ""):
    raise ValueError(f"upn_tiny: unknown config argument {arg!r} (use '' or 'd32')")
  return cfg
