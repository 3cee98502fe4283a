"""Tiny UPN training on the shared trainer (tests, demos; the model of configs/upn_tiny.py).

  chatrex-jax train --config configs/upn_train_tiny.py --workdir /tmp/upn_tiny \
      --config.data.sources='[{"path": "/data/synthetic_engine", "granularity": "both"}]'

get_config("d32") takes the d_model 32 variant of configs/upn_tiny.py. The canvas is small
(max_size 64, short sides 48-64) to match the synthetic scenes; the learning rates are larger
than the official ones because the model starts from random weights.
"""
import importlib.util
import pathlib

import ml_collections

from chatrex_jax.data.upn_data import default_upn_data_config
from chatrex_jax.train.sharding import FSDP_RULES


def _model_section(name: str, arg: str | None):
  path = pathlib.Path(__file__).with_name(name)
  spec = importlib.util.spec_from_file_location(f"_upn_model_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg).model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "upn"
  c.model = _model_section("upn_tiny.py", arg)
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

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.lr_backbone = 1e-3
  c.optim.total_steps = 300
  c.optim.warmup_steps = 20
  c.optim.end_lr_ratio = 0.05
  c.optim.weight_decay = 1e-4
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.clip_norm = 0.1           # DINO clip_max_norm

  c.train = ml_collections.ConfigDict()
  c.train.seed = 0
  c.train.grad_accum = 1
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 2
  c.train.async_checkpointing = True
  c.train.peak_flops = ml_collections.config_dict.placeholder(float)

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.logical_rules = [list(r) for r in FSDP_RULES]
  return c
