"""A tiny ChatRex (same structure as 7B) for tests, the demo and CPU smoke runs.

  chatrex-jax train --config chatrex_tiny:stage1 --workdir /tmp/run \
      --config.data.sources='[{"path": "/tmp/engine_out", "weight": 1.0}]' \
      --config.data.tokenizer_dir=/tmp/tok
"""
import ml_collections

from chatrex_jax.configs import chatrex_7b
from chatrex_jax.models import tiny


def get_config(stage: str = "stage1") -> ml_collections.ConfigDict:
  c = chatrex_7b.get_config(stage)
  c.model.llm = tiny.llm_hf()
  c.model.clip = dict(tiny.CLIP)
  c.model.convnext = dict(tiny.CONVNEXT)
  c.model.aux_image_size = tiny.AUX_IMAGE_SIZE
  c.model.compute_dtype = "float32"
  c.model.scan_layers = False
  c.model.remat_policy = "none"
  c.model.loss_chunks = 0  # chunks sized for one device (LLMConfig.loss_chunks)
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
