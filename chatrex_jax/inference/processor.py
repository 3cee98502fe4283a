"""ChatRex input processing for inference: (image, boxes, question) -> model inputs.

RexSeek's `prepare_input_for_rexseek` (fixture `processor_rexseek`): the image and its boxes go
through `protocol.image.preprocess_image` (the official pixel and box arithmetic, and this
project's input policy), the question through the prompt builder and chat template of
`protocol.prompts` / `protocol.templates`, the prompt through `protocol.tokenize` (ids with the
-200 / -300 placeholders), and batches get the merge plan of `data.merge`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Literal, Sequence

import numpy as np

from chatrex_jax.data import merge
from chatrex_jax.protocol import grammar, prompts, templates, tokenize
from chatrex_jax.protocol import image as I
from chatrex_jax.protocol import tokens as C
from chatrex_jax.protocol.image import ImageInput, ProcessedImage, batch_images, preprocess_image


@dataclasses.dataclass
class ProcessedSample:
  """A processed (image, boxes, question): the image part, the prompt text and the token ids
  (with -200 / -300 placeholders; None when the processor has no tokenizer)."""
  image: ProcessedImage
  user_text: str
  prompt: str
  input_ids: np.ndarray | None


@dataclasses.dataclass
class ChatRexProcessor:
  """Host-side ChatRex preprocessing (images, boxes, prompts, tokens, batches).

  aux_size / clip_size: 768 / 336 for the released models; background: expand2square colour.
  max_objects: box cap (MAX_NUM_OBJECTS); box_overflow: "truncate" (keep max_objects by
  `select_boxes`: the first ones, or the highest-scoring when scores are given; warn and note
  the count) or "raise". exif_transpose: see module doc.
  max_square_side: refuse images whose expand2square canvas side exceeds it.
  tokenizer: a HF tokenizer with the ChatRex special tokens (optional; without one,
  `process` returns the prompt text only). template: a `ChatTemplate` or its name; None detects
  it from the tokenizer (`templates.detect_template`). system: the system turn; None uses the
  template's default (LLaVA's `vicuna_v1` sentence for LLaMA / Vicuna checkpoints; none for
  ChatML / Qwen, as RexSeek's processor), "" leaves it out.
  """
  tokenizer: Any = None
  template: Any = None
  system: str | None = None
  aux_size: int = I.AUX_IMAGE_SIZE
  clip_size: int = I.CLIP_IMAGE_SIZE
  background: tuple[int, int, int] = I.PAD_COLOUR
  max_objects: int = C.MAX_NUM_OBJECTS
  box_overflow: Literal["truncate", "raise"] = "truncate"
  exif_transpose: bool = False
  max_square_side: int = 12000
  mean: tuple[float, float, float] = I.CLIP_MEAN
  std: tuple[float, float, float] = I.CLIP_STD

  def __post_init__(self):
    if self.box_overflow not in ("truncate", "raise"):
      raise ValueError(f"box_overflow must be 'truncate' or 'raise', got {self.box_overflow!r}")
    if self.template is None and self.tokenizer is not None:
      self.template = templates.detect_template(self.tokenizer)
    elif isinstance(self.template, str):
      self.template = templates.get_template(self.template)

  @classmethod
  def from_checkpoint(cls, path: str | os.PathLike, **kwargs) -> "ChatRexProcessor":
    """Processor for a checkpoint directory: its tokenizer (`tokenize.load_tokenizer`, as the
    official code loads it) and the chat template detected from it (and config.json)."""
    path = pathlib.Path(path)
    tokenizer = tokenize.load_tokenizer(path)
    config = None
    if (path / "config.json").exists():
      config = json.loads((path / "config.json").read_text())
    template = kwargs.pop("template", None) or templates.detect_template(tokenizer, config)
    missing = [t for t in C.SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
      raise ValueError(f"tokenizer in {path} lacks {len(missing)} ChatRex tokens (first: "
                       f"{missing[0]!r}); it is not a ChatRex/RexSeek tokenizer")
    return cls(tokenizer=tokenizer, template=template, **kwargs)

  # -- images and boxes ---------------------------------------------------------------------

  def preprocess_image(self, image: ImageInput, boxes=None, scores=None) -> ProcessedImage:
    """`protocol.image.preprocess_image` with this processor's settings."""
    return preprocess_image(image, boxes, scores, aux_size=self.aux_size,
                            clip_size=self.clip_size, background=self.background, mean=self.mean,
                            std=self.std, max_objects=self.max_objects,
                            box_overflow=self.box_overflow, exif_transpose=self.exif_transpose,
                            max_square_side=self.max_square_side)

  # -- prompts and tokens ------------------------------------------------------------------

  def prompt(self, question: str, num_objects: int, system: str | None = None) -> tuple[str, str]:
    """(user text, full prompt string) for a question about an image with num_objects boxes
    (system: this call's system turn; None: the processor's `system`)."""
    if self.template is None:
      raise ValueError("no chat template: pass tokenizer= or template= to ChatRexProcessor")
    user = prompts.build_user_text(question, num_objects)
    return user, templates.apply_template(self.template, user,
                                         system=self.system if system is None else system)

  def process(self, image: ImageInput, question: str, boxes=None,
              system: str | None = None, *, scores=None) -> ProcessedSample:
    """The official `prepare_input_for_rexseek` for one sample (+ our input policy; scores [N]
    only choose the kept boxes when there are more than max_objects)."""
    img = self.preprocess_image(image, boxes, scores)
    user, prompt = self.prompt(question, img.boxes.shape[0], system=system)
    ids = None
    if self.tokenizer is not None:
      ids = np.asarray(tokenize.tokenize_with_placeholders(prompt, self.tokenizer), np.int64)
    return ProcessedSample(image=img, user_text=user, prompt=prompt, input_ids=ids)

  def process_task(self, image: ImageInput, task: str, boxes=None, *, objects=None,
                   granularity: str | None = None, text: str | None = None,
                   variant: int = 0, raw_question: bool = False, scores=None) -> ProcessedSample:
    """`process` with the official question of a task (`protocol.prompts.question`):
    detect / refer / count (objects = categories or expressions), region_caption
    (objects = box indices; granularity category / short_phrase / brief / one_sentence),
    grounded_caption (granularity brief / detailed), chat (text = the question, prefixed with
    the grounded-format sentence unless raw_question)."""
    q = prompts.question(task, objects, granularity=granularity, variant=variant, text=text,
                         raw=raw_question)
    return self.process(image, q, boxes, scores=scores)

  @staticmethod
  def parse(answer: str, sample: ProcessedSample, **kwargs):
    """Parses a decoded answer against the sample's kept input boxes (original-image xyxy)
    with the official visualiser's rule (`inference.grammar.parse_grounded` defaults; kwargs
    select its other options)."""
    return grammar.parse_grounded(answer, sample.image.boxes_original, **kwargs)

  # -- batching ----------------------------------------------------------------------------

  def batch(self, samples: Sequence[ProcessedSample], *, seq_len: int | None = None,
            max_objects: int | None = None, num_image_tokens: int = I.NUM_IMAGE_TOKENS,
            pad_token_id: int = C.DEFAULT_PAD_TOKEN_INDEX, truncate: bool = False
            ) -> dict[str, np.ndarray]:
    """Stacks samples into fixed-shape arrays (see `batch_images`) plus the merge plan of
    `merge.merge_plan` (token_ids, source, source_index, attention_mask, position_ids,
    labels, image_positions, object_positions, lengths)."""
    if any(s.input_ids is None for s in samples):
      raise ValueError("samples have no input_ids: the processor needs a tokenizer")
    out = batch_images([s.image for s in samples], max_objects or self.max_objects)
    plan = merge.merge_plan([s.input_ids for s in samples], seq_len=seq_len,
                               num_objects=[s.image.boxes.shape[0] for s in samples],
                               max_objects=out["boxes"].shape[1],
                               num_image_tokens=num_image_tokens, pad_token_id=pad_token_id,
                               truncate=truncate)
    out.update(plan)
    return out
