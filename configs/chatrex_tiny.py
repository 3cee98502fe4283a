"""A tiny ChatRex (same structure as 7B) for tests, the demo and CPU smoke runs.

  chatrex-jax train --config configs/chatrex_tiny.py:stage1 --workdir /tmp/run \
      --config.data.sources='[{"path": "/tmp/engine_out", "weight": 1.0}]' \
      --config.data.tokenizer_dir=/tmp/tok
"""
import importlib.util
import pathlib

import ml_collections


def get_config(stage: str = "stage1") -> ml_collections.ConfigDict:
  # Loaded by path: config files are run as files, not imported from a package.
  spec = importlib.util.spec_from_file_location("_chatrex_7b", pathlib.Path(__file__).with_name("chatrex_7b.py"))
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  c = base.get_config(stage)
  c.model.llm = dict(vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, max_position_embeddings=4096, model_type="qwen2")
  c.model.clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      image_size=56, patch_size=14, select_layer=-2)
  c.model.convnext = dict(depths=[1, 1, 2, 1], dims=[8, 16, 32, 64])
  c.model.aux_image_size = 128
  c.model.compute_dtype = "float32"
  c.model.scan_layers = False
  c.model.remat_policy = "none"
  c.data.batch_size = 8
  c.data.seq_len = 160
  c.data.max_objects = 16
  c.data.num_threads = 1
  c.optim.lr = 3e-3 if stage == "stage1" else 1e-3
  c.optim.total_steps = 100
  c.optim.warmup_steps = 5
  c.train.log_every = 1
  c.train.checkpoint_every = 20
  return c
