"""UPN-Large training (Swin-L 384 + 5-level deformable DETR, 900 queries) on the shared trainer.

  chatrex-jax train --config upn_train_large --workdir gs://bucket/upn \
      --config.model.init_from=/ckpt/upn_large.pth \
      --config.data.sources='[{"path": "/data/sa1b_engine", "granularity": "fine", "weight": 1.0},
                              {"path": "/data/coco/instances_train2017.json", "format": "coco",
                               "images_dir": "/data/coco/train2017", "granularity": "coarse"}]'

The official UPN training code is not released; the recipe follows the paper (T-Rex2-style
detector, two prompts, Hungarian matching, focal + L1 + GIoU, aux + encoder losses) and DINO's
defaults: AdamW lr 1e-4, backbone lr 1e-5, weight decay 1e-4, clip 0.1, the DETR augmentation
(short side 480-800, max 1333, random crop, flip).
"""
import ml_collections

from chatrex_jax.configs import common, upn_large
from chatrex_jax.data.upn_data import default_upn_data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.task = "upn"
  c.model = upn_large.get_config().model
  c.model.backbone_dtype = "bfloat16"   # Swin in bf16 on accelerators; the rest fp32
  c.model.init_from = ""
  c.model.freeze = ()
  c.loss = ml_collections.ConfigDict(dict(cls_weight=1.0, bbox_weight=5.0, giou_weight=2.0,
                                          aux_loss=True, interm_loss_weight=1.0))

  c.data = default_upn_data_config()    # max_size 1333, DETR scales, crop, flip
  c.data.batch_size = 32
  c.data.max_targets = 100
  c.data.num_workers = 8

  c.optim = common.optim(lr=1e-4, lr_backbone=1e-5, total_steps=90000, warmup_steps=1000,
                         end_lr_ratio=0.1, weight_decay=1e-4, clip_norm=0.1)
  c.train = common.train(log_every=50, checkpoint_every=2000, keep_checkpoints=3)
  c.mesh = common.mesh()
  c.logical_rules = common.logical_rules()
  return c
