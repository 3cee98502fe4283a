"""The demo's pretrained tiny LLM: object lookup learned from text (`chatrex_jax.demo.tiny_llm`).

  python -m chatrex_jax.demo.tiny_llm --workdir /tmp/tiny_llm_run --out chatrex_jax/demo/assets/tiny_llm
  python -m chatrex_jax.demo.tiny_llm ... --config.optim.total_steps=200   # a short smoke run

Sections: model (a LLaMA-family decoder, HF config names), tokenizer (byte-level BPE trained on
the corpus), data (text scenes -> ChatRex conversations with bag-of-words object slots), optim,
train, mesh (as every training config).
"""
import ml_collections

from chatrex_jax.configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.task = "tiny_llm"
  c.model = ml_collections.ConfigDict(dict(
      hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
      num_key_value_heads=4, rope_theta=1e4, rms_norm_eps=1e-5, tie_word_embeddings=True,
      max_position_embeddings=4096, model_type="llama",
      # The shipped weights' settings. 0.1 with optim.lr=1e-3 learns copying from the prompt
      # within 500 steps, which 0.02 with 3e-3 never does (README, "The demo").
      initializer_range=0.02))
  # vocab_size is an upper bound: the BPE stops at 765 merges + specials (869 tokens) here.
  c.tokenizer = ml_collections.ConfigDict(dict(vocab_size=1400, corpus_scenes=3000))
  c.data = ml_collections.ConfigDict(dict(
      seed=0, batch_size=32, seq_len=128, max_objects=16,
      num_image_tokens=16,     # the `<image>` slots (the demo's CLIP grid: 56 px / 14 = 4 x 4)
      slot_noise=0.2,          # object slot = phrase mean embedding + noise of this relative size
      image_noise=1.0,         # image slots: noise of this size relative to the embedding rms
      min_objects=2, max_objects_per_scene=8,
      # Grounded captions (80% of them longer than seq_len with space tokens) are left out.
      tasks=dict(weights={"grounding": 2.0, "region": 2.0, "grounded_caption": 0.0},
                 grounding_kinds={"category": 1.0, "phrase": 1.0, "referring": 2.0},
                 region_granularities={"category": 2.0, "short_phrase": 1.0, "brief": 0.5,
                                       "one_sentence": 0.25},
                 grounding_max_queries=3, region_max_regions=3, prompt_variants="all",
                 brief_caption_max_sentences=1, turns=1),
      proposals=dict(use_stored=False, synthesize=True, min_extra=0, max_extra=8, dedup_iou=0.5,
                     jitter_prob=0.5, jitter_scale=0.3),
      # The drill: rows that supervise the lookup densely: crowded scenes, 4-8 phrases or
      # categories per grounding question (`grounding_repeat_queries`: drawn with replacement,
      # so no answer is completed by elimination) and 4-8 regions per category question, so
      # every row holds several `<objK>` choices (the mix above averages under two). The first
      # `steps` batches are all drill rows, later batches `share` of them. Off for the shipped
      # weights: neither a drill first (1500 steps, then the mix) nor half of every batch with
      # repeated queries beat them on held-out lookups (README, "The demo").
      drill=dict(steps=0, share=0.0, min_objects=5, tasks=dict(
          weights={"grounding": 1.0, "region": 1.0, "grounded_caption": 0.0},
          grounding_kinds={"phrase": 1.0, "category": 1.0}, region_granularities={"category": 1.0},
          grounding_min_queries=4, grounding_max_queries=8, grounding_repeat_queries=False,
          region_min_regions=4, region_max_regions=8))))
  c.optim = common.optim(lr=3e-3, total_steps=8000, warmup_steps=200, end_lr_ratio=0.1,
                         weight_decay=0.01, clip_norm=1.0)
  c.train = common.train(log_every=50, checkpoint_every=500, keep_checkpoints=2,
                         async_checkpointing=False, max_label_tokens=0)
  c.mesh = common.mesh(fsdp=1)
  c.logical_rules = common.logical_rules()
  return c
