"""ChatRex's token vocabulary: placeholders, special tokens, label and placeholder ids.

Values follow RexSeek `rexseek/utils/constants.py` (the ChatRex MLLM design).
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
# Added to the LLM vocabulary as special tokens, in this order (104 tokens, docs/architecture.md B.7).
SPECIAL_TOKENS = OBJECT_TOKENS + (GROUND_START, GROUND_END, OBJECTS_START, OBJECTS_END)

# Qwen2 chat special tokens (not added by ChatRex; part of the Qwen vocabulary).
QWEN_IM_START = "<|im_start|>"
QWEN_IM_END = "<|im_end|>"
QWEN_ENDOFTEXT = "<|endoftext|>"

# Merge-plan source codes: where each position of the merged sequence takes its embedding from
# (`data.merge.merge_plan` writes them, `models.merge.merge_embeddings` reads them; the values
# of the chatrex_forward fixture's merged_token_types).
SOURCE_PAD = -1
SOURCE_TEXT = 0
SOURCE_IMAGE = 1
SOURCE_OBJECT = 2

# The arrays of one model batch (`models.chatrex.ChatRex.__call__`'s inputs): what the data
# pipeline yields and the inference pipeline builds; training adds "labels".
MODEL_INPUT_KEYS = ("pixel_values", "pixel_values_aux", "boxes", "box_mask", "token_ids", "source",
                    "source_index", "attention_mask", "position_ids")
