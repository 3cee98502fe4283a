"""Constants shared by the processor, tokenisation, the model's embedding merge and the parser.

Values follow RexSeek `rexseek/utils/constants.py` (the ChatRex MLLM design, spec B.7).
`<image>` and `<objfeat>` are *placeholders*, not vocabulary tokens: tokenisation maps them to
the negative ids below, and the model replaces them by image / object embeddings.
"""
from __future__ import annotations

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
OBJECT_TOKEN_INDEX = -300
DEFAULT_OBJECT_INDEX = OBJECT_TOKEN_INDEX  # the official name
DEFAULT_PAD_TOKEN_INDEX = 0

MAX_NUM_OBJECTS = 100
NUM_IMAGE_TOKENS = 576  # 24 x 24 CLIP-L/14 patches at 336 px (= ConvNeXt-L last stage at 768 px)

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_OBJECT_FEATURE_TOKEN = "<objfeat>"
DEFAULT_OBJECT_TOKEN = "<obj<i>>"  # official template; "<i>" is replaced by the index
PLACEHOLDERS = (DEFAULT_IMAGE_TOKEN, DEFAULT_OBJECT_FEATURE_TOKEN)

GROUND_START = "<ground>"
GROUND_END = "</ground>"
OBJECTS_START = "<objects>"
OBJECTS_END = "</objects>"


def object_token(i: int) -> str:
  """`<obj{i}>` for 0 <= i < MAX_NUM_OBJECTS."""
  if not 0 <= i < MAX_NUM_OBJECTS:
    raise ValueError(f"object index {i} outside [0, {MAX_NUM_OBJECTS})")
  return f"<obj{i}>"


OBJECT_TOKENS = tuple(f"<obj{i}>" for i in range(MAX_NUM_OBJECTS))
# Added to the LLM vocabulary as special tokens, in this order (104 tokens, spec B.7).
SPECIAL_TOKENS = OBJECT_TOKENS + (GROUND_START, GROUND_END, OBJECTS_START, OBJECTS_END)

# Qwen2 chat special tokens (not added by ChatRex; part of the Qwen vocabulary).
QWEN_IM_START = "<|im_start|>"
QWEN_IM_END = "<|im_end|>"
QWEN_ENDOFTEXT = "<|endoftext|>"

# Image preprocessing (openai/clip-vit-large-patch14-336 processor, resized to 768 by
# RexSeek's `modify_processor_resolution`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOUR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104): int() truncates
AUX_IMAGE_SIZE = 768
CLIP_IMAGE_SIZE = 336
