"""ChatRex-7B (Qwen2.5-7B + CLIP-L/14-336 + ConvNeXt-L) training, three stages.

  chatrex-jax train --config configs/chatrex_7b.py:stage1 --workdir gs://bucket/run \
      --config.model.init_from=/ckpt/chatrex_init --config.data.sources='[{"path": "/data/rexverse", "weight": 1.0}]'

stage1 (alignment): projectors + input/output embeddings; stage2 (perception, Rexverse-2M)
and stage3 (joint): everything (vision-tower switches below). Learning rates follow LLaVA
practice (1e-3 alignment, 2e-5 full fine-tuning); the paper does not publish them (spec E.9).
"""
import ml_collections

from chatrex_jax.data.pipeline import default_data_config
from chatrex_jax.train.sharding import FSDP_RULES

QWEN25_7B = dict(vocab_size=151769, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, max_position_embeddings=32768, model_type="qwen2")


def get_config(stage: str = "stage2") -> ml_collections.ConfigDict:
  if stage not in ("stage1", "stage2", "stage3"):
    raise ValueError(f"stage must be stage1|stage2|stage3, got {stage!r}")
  c = ml_collections.ConfigDict()
  c.task = "chatrex"
  c.stage = stage
  c.model = ml_collections.ConfigDict()
  c.model.llm = dict(QWEN25_7B)
  c.model.clip = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16, image_size=336, patch_size=14, select_layer=-2)
  c.model.convnext = dict(depths=[3, 3, 27, 3], dims=[192, 384, 768, 1536])
  c.model.aux_image_size = 768
  c.model.compute_dtype = "bfloat16"   # fp32 master weights, bf16 matmuls
  c.model.scan_layers = True
  c.model.remat_policy = "dots_no_batch"
  c.model.train_vision_tower = stage != "stage1"
  c.model.train_vision_tower_aux = False  # the released ConvNeXt runs under no_grad
  c.model.init_from = ""                  # official-layout checkpoint folder ("" = random init)

  c.data = default_data_config()
  c.data.batch_size = 256 if stage == "stage1" else 128
  c.data.seq_len = 2048
  c.data.tokenizer_dir = ""

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3 if stage == "stage1" else 2e-5
  c.optim.total_steps = 5000
  c.optim.warmup_steps = 150
  c.optim.end_lr_ratio = 0.0
  c.optim.weight_decay = 0.0
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.clip_norm = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.seed = 0
  c.train.grad_accum = 1
  c.train.log_every = 10
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.async_checkpointing = True
  c.train.peak_flops = ml_collections.config_dict.placeholder(float)

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.logical_rules = [list(r) for r in FSDP_RULES]
  return c
