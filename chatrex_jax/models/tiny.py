"""Tiny ChatRex configurations for tests, the demo and smoke runs (same structure as 7B)."""
from __future__ import annotations

from chatrex_jax.models.chatrex import ChatRexConfig
from chatrex_jax.models.clip_vit import CLIPVisionConfig
from chatrex_jax.models.convnext import ConvNeXtConfig
from chatrex_jax.models.llm import LLMConfig


def tiny_config(vocab_size: int, *, family: str = "qwen2", hidden: int = 64, layers: int = 2,
                clip_image_size: int = 56, aux_image_size: int = 128, **llm_overrides) -> ChatRexConfig:
  """CLIP 56 px / patch 14 (16 tokens) + ConvNeXt dims [8,16,32,64] at 128 px (4x4 last map):
  the released model's constraint #CLIP patches == #last-stage ConvNeXt tokens holds."""
  llm = LLMConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  rope_theta=1e6 if family == "qwen2" else 1e4, family=family,
                  attention_bias=family == "qwen2", max_position_embeddings=4096, **llm_overrides)
  clip = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=clip_image_size, patch_size=14)
  convnext = ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64))
  return ChatRexConfig(llm=llm, clip=clip, convnext=convnext, aux_image_size=aux_image_size)
