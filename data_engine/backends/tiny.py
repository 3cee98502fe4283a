"""TINY RANDOM transformers models for tests and benchmarks (offline, seconds to build).

`make_tiny_models(root)` saves three real-architecture models with random weights under
`root/{vlm,grounding,llm}` (LLaVA = CLIP ViT + LLaMA for image-text-to-text, Grounding
DINO = Swin + BERT for zero-shot detection, LLaMA for causal LM) with word-level
tokenizers over a small English vocabulary. Their outputs are gibberish by design: they
exercise the exact loading, batching and post-processing code paths of `backends/hf.py`.
"""
from __future__ import annotations

import os

WORDS = ("a an the of and with on in is are there this that it to at red green blue yellow "
         "purple white black large small big circle square triangle dot shape object image "
         "region left right top bottom middle center describe phrase description yes no "
         "Yes No man dog cat car tree sky").split()
_PUNCT = [".", ",", ":", "?", "!"]


def _word_tokenizer(special: list[str]):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(special + WORDS + _PUNCT)}
  tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                bos_token="<s>", eos_token="</s>")
  return tok, vocab


def make_tiny_models(root: str, seed: int = 0) -> dict[str, str]:
  """Build and save the three tiny models; returns {"vlm": dir, "grounding": dir, "llm": dir}."""
  import torch
  from transformers import (
    BertConfig,
    BertTokenizerFast,
    CLIPImageProcessor,
    CLIPVisionConfig,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SwinConfig,
  )
  torch.manual_seed(seed)
  dirs = {k: os.path.join(root, k) for k in ("vlm", "grounding", "llm")}

  # -- LLM (verifier / rewriter) and the VLM's language model share a tokenizer layout.
  tok, vocab = _word_tokenizer(["<pad>", "<unk>", "<s>", "</s>", "<image>"])
  tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
  text_cfg = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=3)
  llm = LlamaForCausalLM(LlamaConfig(**text_cfg)).eval()
  llm.save_pretrained(dirs["llm"])
  tok.save_pretrained(dirs["llm"])

  chat = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}"
          "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
          "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} {% endfor %}"
          "{% if add_generation_prompt %}assistant: {% endif %}")
  vlm_cfg = LlavaConfig(
      vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8),
      text_config=LlamaConfig(**text_cfg), image_token_index=vocab["<image>"],
      vision_feature_layer=-1, projector_hidden_act="gelu")
  vlm = LlavaForConditionalGeneration(vlm_cfg).eval()
  proc = LlavaProcessor(
      image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                         crop_size={"height": 32, "width": 32}),
      tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
      chat_template=chat, num_additional_image_tokens=1)
  vlm.save_pretrained(dirs["vlm"])
  proc.save_pretrained(dirs["vlm"])

  # -- Grounding DINO with a BERT word-piece tokenizer.
  bvocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _PUNCT + WORDS
  btok = BertTokenizerFast(vocab={w: i for i, w in enumerate(bvocab)}, do_lower_case=True)
  gd_cfg = GroundingDinoConfig(
      backbone_config=SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 1], window_size=4,
                                 image_size=64, out_features=["stage1", "stage2"]),
      text_config=BertConfig(vocab_size=len(bvocab), hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=64),
      d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
      decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=20,
      num_feature_levels=2, encoder_n_points=2, decoder_n_points=2, max_text_len=32)
  gd = GroundingDinoForObjectDetection(gd_cfg).eval()
  gproc = GroundingDinoProcessor(
      image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
      tokenizer=btok)
  gd.save_pretrained(dirs["grounding"])
  gproc.save_pretrained(dirs["grounding"])
  return dirs
