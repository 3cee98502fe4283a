"""The tiny ChatRex sizes, defined once: tests, the demo, CPU smoke runs and
`chatrex_jax/configs/chatrex_tiny.py` all take them from here (same structure as 7B, fewer/smaller blocks).

CLIP 56 px / patch 14 (16 image tokens) + ConvNeXt dims [8, 16, 32, 64] at 128 px (4 x 4 last
map): the released model's constraint #CLIP patches == #last-stage ConvNeXt tokens holds. The
LLM follows its family's conventions, as the two real bases do: Qwen2 (the paper) has q/k/v
biases, RoPE theta 1e6 and RMS eps 1e-6; LLaMA (Vicuna, the release) none, 1e4 and 1e-5.
"""
from __future__ import annotations

from chatrex_jax.models.chatrex import ChatRexConfig

CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            image_size=56, patch_size=14, select_layer=-2)
CONVNEXT = dict(depths=[1, 1, 2, 1], dims=[8, 16, 32, 64])
AUX_IMAGE_SIZE = 128
FAMILY_DEFAULTS = {
    "qwen2": dict(model_type="qwen2", rope_theta=1e6, rms_norm_eps=1e-6),
    "llama": dict(model_type="llama", rope_theta=1e4, rms_norm_eps=1e-5),
}


def llm_hf(vocab_size: int = 0, *, family: str = "qwen2", hidden: int = 64, layers: int = 2) -> dict:
  """The tiny LLM as a HF config dict (vocab_size 0: taken from the tokenizer by the trainer)."""
  if family not in FAMILY_DEFAULTS:
    raise ValueError(f"family must be one of {sorted(FAMILY_DEFAULTS)}, got {family!r}")
  return dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
              tie_word_embeddings=False, max_position_embeddings=4096, **FAMILY_DEFAULTS[family])


def tiny_config(vocab_size: int, *, family: str = "qwen2", hidden: int = 64, layers: int = 2,
                clip_image_size: int = CLIP["image_size"], aux_image_size: int = AUX_IMAGE_SIZE,
                **llm_overrides) -> ChatRexConfig:
  """ChatRexConfig of the tiny sizes (llm_overrides: LLMConfig fields)."""
  return ChatRexConfig.from_dict(dict(
      llm=llm_hf(vocab_size, family=family, hidden=hidden, layers=layers),
      clip=dict(CLIP, image_size=clip_image_size), convnext=CONVNEXT, aux_image_size=aux_image_size),
      llm_hints=llm_overrides)
