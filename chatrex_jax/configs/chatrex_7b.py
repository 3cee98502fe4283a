"""ChatRex-7B training, three stages, on either LLM base.

  chatrex-jax train --config chatrex_7b:stage1 --workdir gs://bucket/run \
      --config.model.init_from=/ckpt/chatrex_init --config.data.sources='[{"path": "/data/rexverse", "weight": 1.0}]'
  chatrex-jax train --config chatrex_7b:stage3,vicuna --workdir /ckpt/ft \
      --config.model.init_from=/ckpt/ChatRex-7B --config.data.tokenizer_dir=/ckpt/ChatRex-7B

ARG = STAGE[,BASE]. STAGE: stage1 (alignment: projectors + input/output embeddings), stage2
(perception, Rexverse-2M) or stage3 (joint): everything but the ConvNeXt tower (switches below).
BASE: "qwen2.5" (default; Qwen2.5-7B, the paper's recipe) or "vicuna" (Vicuna-7B v1.5, a
LLaMA: the base of the released ChatRex-7B, for fine-tuning from the release). Both carry
ChatRex's 104 added tokens in the vocabulary. Learning rates follow LLaVA practice (1e-3
alignment, 2e-5 full fine-tuning); the paper does not publish them.
"""
import ml_collections

from chatrex_jax.configs import common
from chatrex_jax.data.pipeline import default_data_config

QWEN25_7B = dict(vocab_size=151769, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, max_position_embeddings=32768, model_type="qwen2")
# Vicuna-7B v1.5 (LLaMA-2 7B): 32000 sentencepiece tokens + ChatRex's 104 at 32000-32103.
VICUNA_7B = dict(vocab_size=32000 + 104, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, rope_theta=1e4, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, max_position_embeddings=4096, attention_bias=False,
                 model_type="llama")
BASES = {"qwen2.5": QWEN25_7B, "vicuna": VICUNA_7B}


def get_config(arg: str = "stage2") -> ml_collections.ConfigDict:
  stage, _, base = arg.partition(",")
  base = base or "qwen2.5"
  if stage not in ("stage1", "stage2", "stage3"):
    raise ValueError(f"stage must be stage1|stage2|stage3, got {stage!r} (ARG = STAGE[,BASE])")
  if base not in BASES:
    raise ValueError(f"base must be one of {sorted(BASES)}, got {base!r} (ARG = STAGE[,BASE])")
  c = ml_collections.ConfigDict()
  c.task = "chatrex"
  c.stage = stage
  c.model = ml_collections.ConfigDict()
  c.model.base = base
  c.model.llm = dict(BASES[base])
  c.model.clip = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16, image_size=336, patch_size=14, select_layer=-2)
  c.model.convnext = dict(depths=[3, 3, 27, 3], dims=[192, 384, 768, 1536])
  c.model.aux_image_size = 768
  c.model.compute_dtype = "bfloat16"   # fp32 master weights, bf16 matmuls
  c.model.scan_layers = True
  # Activation checkpointing: keep the matmul outputs without batch dimensions, recompute the
  # rest. Vicuna's stages 2 and 3 keep every activation instead: with the flash kernel on v5p
  # that is the step above 50% MFU by XLA's estimate, and at the 4 sequences per chip of
  # v5p-64 the TPU compiler plans 61.6 of 95 GiB (launch/README.md). Stage 1 trains at 8
  # sequences per chip there and needs the remat; Qwen2.5 reaches 50% with it.
  c.model.remat_policy = ("none" if base == "vicuna" and stage != "stage1"
                          else "dots_no_batch")
  # The fused LM head + loss in 4 chunks of every row's positions: a quarter of the logits per
  # device at a time, 4 head-gradient reductions per step (LLMConfig.loss_chunks).
  c.model.loss_chunks = 4
  # The cache-free attention: "auto" = jax's Pallas flash-attention kernel on TPU, the XLA
  # blocks elsewhere (LLMConfig.attention_impl); "xla" / "pallas_tpu" to force one.
  c.model.attention_impl = "auto"
  c.model.train_vision_tower = stage != "stage1"
  c.model.train_vision_tower_aux = False  # the released ConvNeXt runs under no_grad
  c.model.init_from = ""                  # official-layout checkpoint folder ("" = random init)

  c.data = default_data_config()
  c.data.batch_size = 256 if stage == "stage1" else 128
  c.data.seq_len = 2048
  c.data.tokenizer_dir = ""

  c.optim = common.optim(lr=1e-3 if stage == "stage1" else 2e-5, total_steps=5000,
                         warmup_steps=150, end_lr_ratio=0.0, weight_decay=0.0, clip_norm=1.0)
  c.train = common.train(log_every=10, checkpoint_every=500, keep_checkpoints=3,
                         trainable_patterns=[],   # [] = the stage's (train.optimizer.STAGE_PATTERNS)
                         max_label_tokens=0)      # > 0: logits only at the first N labels per row
  c.mesh = common.mesh()
  c.logical_rules = common.logical_rules()
  return c
