"""Tiny UPN training on the shared trainer (tests, demos; the model of chatrex_jax/configs/upn_tiny.py).

  chatrex-jax train --config upn_train_tiny --workdir /tmp/upn_tiny \
      --config.data.sources='[{"path": "/data/synthetic_engine", "granularity": "both"}]'

get_config("d32") takes the d_model 32 variant of chatrex_jax/configs/upn_tiny.py. The canvas is small
(max_size 64, short sides 48-64) to match the synthetic scenes; the learning rates are larger
than the official ones because the model starts from random weights.
"""
import ml_collections

from chatrex_jax.configs import common, upn_tiny
from chatrex_jax.data.upn_data import default_upn_data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "upn"
  c.model = upn_tiny.get_config(arg).model
  c.model.init_from = ""            # official UPN checkpoint ("" = random init)
  c.model.freeze = ()               # glob patterns of frozen parameters, e.g. ("backbone/*",)
  c.loss = ml_collections.ConfigDict(dict(cls_weight=1.0, bbox_weight=5.0, giou_weight=2.0,
                                          aux_loss=True, interm_loss_weight=1.0))

  c.data = default_upn_data_config()
  c.data.batch_size = 8
  c.data.max_size = 64
  c.data.scales = [48, 56, 64]
  c.data.max_targets = 12
  c.data.num_threads = 2
  c.data.prefetch_buffer_size = 2

  c.optim = common.optim(lr=1e-3, lr_backbone=1e-3, total_steps=300, warmup_steps=20,
                         end_lr_ratio=0.05, weight_decay=1e-4,
                         clip_norm=0.1)           # DINO clip_max_norm
  c.train = common.train(log_every=10, checkpoint_every=100, keep_checkpoints=2)
  c.mesh = common.mesh()
  c.logical_rules = common.logical_rules()
  return c
