"""Data engine on SYNTHETIC SCENES with oracle backends (tests, demo; not real data).

    chatrex-jax data-engine --config data_engine_synthetic:200 --output /tmp/scenes

ARG: "N" or "N,IMAGE_SIZE" or "N,IMAGE_SIZE,SEED" (default 64 images of 128 px, seed 0).
"""
import ml_collections

from data_engine.config import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = [p for p in (arg or "").split(",") if p]
  num_images = int(parts[0]) if parts else 64
  image_size = int(parts[1]) if len(parts) > 1 else 128
  seed = int(parts[2]) if len(parts) > 2 else 0
  config = base_config()
  config.name = "synthetic_scenes"
  config.sources = [{"kind": "synthetic", "name": "synthetic_scenes", "seed": seed,
                     "num_images": num_images, "image_size": image_size,
                     "min_objects": 2, "max_objects": 6, "part_prob": 0.5}]
  config.records_per_shard = 64
  config.filters.min_side = 16
  config.backends = {"vlm": {"kind": "oracle_vlm"},
                     "grounding": {"kind": "oracle_grounding"},
                     "verifier": {"kind": "oracle_verifier"}}
  config.conversations.enabled = True
  config.conversations.questions = ["What objects are in this image?",
                                    "Which shapes have a dot?"]
  return config
