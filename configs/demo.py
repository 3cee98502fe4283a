"""`chatrex-jax demo`: the embedded end-to-end run (synthetic scenes, tiny models, CPU-sized).

  chatrex-jax demo                       # get_config("full"): <= 15 min on 2 CPU cores
  chatrex-jax demo --quick               # get_config("quick"): the CI smoke run (~3 min)
  chatrex-jax demo --config.upn.steps=600 --config.chatrex.stage2.steps=3000

Sections: data (the engine's synthetic scenes), tokenizer, upn (overrides of
configs/upn_train_tiny.py), proposals (UPN filtering for the MLLM), chatrex (the LLM and the
three training stages on top of configs/chatrex_tiny.py), eval (held-out protocol, thresholds).
"""
import ml_collections


def _stage(steps: int, lr: float, weights: dict, kinds: dict | None = None) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      steps=steps, lr=lr, warmup_steps=max(1, steps // 20),
      task_weights=dict(weights),
      grounding_kinds=dict(kinds or {"category": 1.0, "phrase": 0.5, "referring": 2.0})))


def get_config(mode: str = "full") -> ml_collections.ConfigDict:
  if mode not in ("full", "quick"):
    raise ValueError(f"demo config mode must be 'full' or 'quick', got {mode!r}")
  quick = mode == "quick"
  c = ml_collections.ConfigDict()
  c.mode = mode

  # Scenes: 2-6 coloured shapes, about half with a white dot (the "part": fine-grained
  # regions next to the coarse whole objects); held-out scenes come from another seed.
  c.data = ml_collections.ConfigDict(dict(
      num_train=48 if quick else 400, num_heldout=12 if quick else 80, image_size=128,
      train_seed=0, heldout_seed=1, records_per_shard=128))

  c.tokenizer = ml_collections.ConfigDict(dict(vocab_size=700, family="qwen"))

  c.upn = ml_collections.ConfigDict(dict(
      model_arg="d32", steps=30 if quick else 500, lr=1e-3, batch_size=8, canvas=64,
      scales=[56, 64], crop_prob=0.0, max_targets=16))

  # UPN filtering of the proposals the MLLM sees (training records and held-out candidates).
  c.proposals = ml_collections.ConfigDict(dict(prompt="both", min_score=0.2, nms_iou=0.5,
                                               max_per_image=12))

  tiny_llm = dict(vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, max_position_embeddings=4096, model_type="qwen2")
  c.chatrex = ml_collections.ConfigDict()
  c.chatrex.llm = tiny_llm
  c.chatrex.batch_size = 16
  c.chatrex.seq_len = 160
  c.chatrex.max_objects = 16
  c.chatrex.train_vision_tower_aux = True   # random-init ConvNeXt: its RoI features must learn
  # Stage 1 aligns projectors + embeddings; stage 2 trains everything on perception
  # (grounding, region understanding); stage 3 adds grounded captions and conversations.
  perception = {"grounding": 3.0, "region": 1.0, "grounded_caption": 0.0, "conversation": 0.0}
  joint = {"grounding": 3.0, "region": 1.0, "grounded_caption": 0.5, "conversation": 0.5}
  c.chatrex.stage1 = _stage(10 if quick else 200, 3e-3, perception)
  c.chatrex.stage2 = _stage(20 if quick else 2000, 3e-3, perception)
  c.chatrex.stage3 = _stage(10 if quick else 400, 1e-3, joint)

  c.eval = ml_collections.ConfigDict(dict(
      iou=0.5, batch_size=16, max_new_tokens=24, num_visualisations=6, seed=0,
      # The bar for the full run; --quick reports them but is too short to reach them.
      thresholds={"upn_recall": 0.8, "referring_accuracy": 0.7}))
  return c
