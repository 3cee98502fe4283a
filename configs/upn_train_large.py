"""UPN-Large training (Swin-L 384 + 5-level deformable DETR, 900 queries) on the shared trainer.

  chatrex-jax train --config configs/upn_train_large.py --workdir gs://bucket/upn \
      --config.model.init_from=/ckpt/upn_large.pth \
      --config.data.sources='[{"path": "/data/sa1b_engine", "granularity": "fine", "weight": 1.0},
                              {"path": "/data/coco/instances_train2017.json", "format": "coco",
                               "images_dir": "/data/coco/train2017", "granularity": "coarse"}]'

The official UPN training code is not released; the recipe follows the paper (T-Rex2-style
detector, two prompts, Hungarian matching, focal + L1 + GIoU, aux + encoder losses) and DINO's
defaults: AdamW lr 1e-4, backbone lr 1e-5, weight decay 1e-4, clip 0.1, the DETR augmentation
(short side 480-800, max 1333, random crop, flip).
"""
import importlib.util
import pathlib

import ml_collections

from chatrex_jax.data.upn_data import default_upn_data_config
from chatrex_jax.train.sharding import FSDP_RULES


def _model_section(name: str, arg: str | None = None):
  path = pathlib.Path(__file__).with_name(name)
  spec = importlib.util.spec_from_file_location(f"_upn_model_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg).model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.task = "upn"
  c.model = _model_section("upn_large.py")
  c.model.backbone_dtype = "bfloat16"   # Swin in bf16 on accelerators; the rest fp32
  c.model.init_from = ""
  c.model.freeze = ()
  c.loss = ml_collections.ConfigDict(dict(cls_weight=1.0, bbox_weight=5.0, giou_weight=2.0,
                                          aux_loss=True, interm_loss_weight=1.0))

  c.data = default_upn_data_config()    # max_size 1333, DETR scales, crop, flip
  c.data.batch_size = 32
  c.data.max_targets = 100
  c.data.num_workers = 8

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.lr_backbone = 1e-5
  c.optim.total_steps = 90000
  c.optim.warmup_steps = 1000
  c.optim.end_lr_ratio = 0.1
  c.optim.weight_decay = 1e-4
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.clip_norm = 0.1

  c.train = ml_collections.ConfigDict()
  c.train.seed = 0
  c.train.grad_accum = 1
  c.train.log_every = 50
  c.train.checkpoint_every = 2000
  c.train.keep_checkpoints = 3
  c.train.async_checkpointing = True
  c.train.peak_flops = ml_collections.config_dict.placeholder(float)

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.logical_rules = [list(r) for r in FSDP_RULES]
  return c
