"""End-to-end ChatRex inference: image (+ boxes or UPN proposals) + task -> answer -> boxes.

  pipe = ChatRexPipeline.from_checkpoint("ChatRex-7B")        # config.json + safetensors + tokenizer
  out = pipe.run(image, task="detect", objects="person; pigeon", boxes=proposals)
  out.answer, out.parsed.phrases[0].boxes

Batches of samples are padded to fixed shapes (sequence length rounded up to `seq_bucket`,
boxes to `max_objects`, the batch to a multiple of `batch_bucket` by repeating its last sample),
so one compilation serves many calls; the image/object embedding step and the generation loop
are both jitted.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from chatrex_jax.inference.generate import SamplingConfig, eos_ids_for, generate
from chatrex_jax.inference.processor import ChatRexProcessor, ProcessedSample
from chatrex_jax.models.chatrex import ChatRex, ChatRexConfig
from chatrex_jax.models.llm import change_kernel_layout
from chatrex_jax.protocol import grammar as parser_lib
from chatrex_jax.protocol import tokens as C


@dataclasses.dataclass
class Prediction:
  question: str
  answer: str  # decoded, special tokens kept, stripped (official decode)
  parsed: parser_lib.ParseResult
  boxes: np.ndarray  # the kept input boxes (original-image xyxy) the indices refer to
  notes: list[str]  # input policy notes, incl. how many boxes the 100-tag cap dropped and how
  prompt: str = ""  # the whole prompt the LLM saw (chat template, placeholders), for audits

  def to_dict(self) -> dict:
    return {"question": self.question, "prompt": self.prompt, "answer": self.answer,
            "parsed": self.parsed.to_dict(), "boxes": self.boxes.tolist(), "notes": self.notes}


@functools.partial(jax.jit, static_argnames=("model",))
def _embed(model: ChatRex, params, batch):
  embeds, _ = model.apply({"params": params}, batch, method=ChatRex.embed_inputs)
  return embeds


class ChatRexPipeline:
  """Processor -> ChatRex -> generation, in fixed-shape buckets.

  The LLM's projections are kept in `llm_kernel_layout` (default torch's [out, in],
  `LLMConfig.kernel_layout`): params in another layout are re-stored once here.
  "out_in_fused" (q / k / v and gate / up joined) decodes faster on CPU (7-13% at batch 1 on
  the 135M models, up to 5% at batch 8); joining holds both copies of those kernels while it
  runs, which a checkpoint that only just fits host memory may not allow.
  """

  def __init__(self, config: ChatRexConfig, params, processor: ChatRexProcessor, *,
               max_objects: Optional[int] = None, seq_bucket: int = 64, batch_bucket: int = 1,
               llm_kernel_layout: str = "out_in"):
    if config.llm.kernel_layout != llm_kernel_layout:
      llm_config, llm_params = change_kernel_layout(params["llm"], config.llm, llm_kernel_layout)
      config, params = dataclasses.replace(config, llm=llm_config), {**params, "llm": llm_params}
    self.config = config
    self.params = params
    self.processor = processor
    self.model = ChatRex(config)
    self.max_objects = max_objects or processor.max_objects
    self.seq_bucket = seq_bucket
    self.batch_bucket = batch_bucket
    self.eos_ids = eos_ids_for(processor.tokenizer)

  @classmethod
  def from_checkpoint(cls, path, *, dtype=None, seq_bucket: int = 64, batch_bucket: int = 1,
                      llm_kernel_layout: str = "out_in", **processor_kwargs) -> "ChatRexPipeline":
    from chatrex_jax.convert import chatrex as chatrex_convert
    config, params, _ = chatrex_convert.load(path, dtype=dtype, kernel_layout="out_in")
    processor = ChatRexProcessor.from_checkpoint(
        path, aux_size=config.aux_image_size, clip_size=config.clip.image_size, **processor_kwargs)
    if llm_kernel_layout != config.llm.kernel_layout:   # on the host, before the device copy
      llm_config, params["llm"] = change_kernel_layout(params["llm"], config.llm, llm_kernel_layout)
      config = dataclasses.replace(config, llm=llm_config)
    return cls(config, jax.device_put(params), processor, seq_bucket=seq_bucket,
               batch_bucket=batch_bucket, llm_kernel_layout=llm_kernel_layout)

  def prepare(self, samples: Sequence[ProcessedSample]) -> dict:
    """Fixed-shape model batch for processed samples (right-padded; NHWC images)."""
    longest = max(len(s.input_ids) + self.config.num_image_tokens for s in samples)
    seq_len = -(-longest // self.seq_bucket) * self.seq_bucket
    arrays = self.processor.batch(samples, seq_len=seq_len, max_objects=self.max_objects,
                                  num_image_tokens=self.config.num_image_tokens)
    return {k: jnp.asarray(arrays[k]) for k in C.MODEL_INPUT_KEYS}

  def generate(self, samples: Sequence[ProcessedSample], sampling: SamplingConfig) -> list[str]:
    n = len(samples)
    padded = list(samples) + [samples[-1]] * (-n % self.batch_bucket)
    batch = self.prepare(padded)
    embeds = _embed(self.model, self.params, batch)
    out = generate(self.model.llm_module, self.params["llm"], inputs_embeds=embeds,
                   attention_mask=batch["attention_mask"], sampling=sampling)
    texts = []
    for row, length in zip(out.tokens[:n], out.lengths[:n]):
      ids = [int(t) for t in row[:length] if int(t) not in self.eos_ids]
      texts.append(self.processor.tokenizer.decode(ids, skip_special_tokens=False).strip())
    return texts

  def run_batch(self, images: Sequence[Any], questions: Sequence[str], boxes: Sequence[Any], *,
                scores: Optional[Sequence[Any]] = None, max_new_tokens: int = 512,
                temperature: float = 0.0, top_p: float = 1.0, rng=None) -> list[Prediction]:
    """Answers one question per image, each about its own boxes (original-image xyxy).
    scores: per image [N] box scores or None; with more boxes than max_objects the
    highest-scoring are kept (else the first ones; see `processor.select_boxes`)."""
    scores = [None] * len(images) if scores is None else list(scores)
    if not len(images) == len(questions) == len(boxes) == len(scores):
      raise ValueError(f"got {len(images)} images, {len(questions)} questions, {len(boxes)} box "
                       f"lists, {len(scores)} score lists")
    samples = [self.processor.process(img, q, b, scores=sc)
               for img, q, b, sc in zip(images, questions, boxes, scores)]
    pad = self.processor.tokenizer.pad_token_id
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              eos_ids=self.eos_ids, pad_id=0 if pad is None else int(pad))
    answers = self.generate(samples, sampling)
    return [Prediction(question=q, answer=a, parsed=self.processor.parse(a, s),
                       boxes=s.image.boxes_original, notes=s.image.notes, prompt=s.prompt)
            for q, a, s in zip(questions, answers, samples)]

  def run(self, image, task: str = "detect", *, boxes=None, scores=None, objects=None,
          granularity=None, text=None, variant: int = 0, raw_question: bool = False,
          **kw) -> Prediction:
    """One image, one task with the official prompt (see `protocol.prompts.question`;
    raw_question: task "chat" sends text verbatim). boxes [N, 4] original-image xyxy; scores
    [N] or None (see `run_batch`)."""
    from chatrex_jax.protocol import prompts
    question = prompts.question(task, objects, granularity=granularity, variant=variant, text=text,
                                raw=raw_question)
    return self.run_batch([image], [question], [np.zeros((0, 4)) if boxes is None else boxes],
                          scores=[scores], **kw)[0]
