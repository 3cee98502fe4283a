"""transformers backends, loaded from LOCAL directories only (`local_files_only=True`).

* `HFVisionLanguage`: `AutoProcessor` + `AutoModelForImageTextToText` (InternVL, Qwen2-VL,
  LLaVA, ... anything with an image-text-to-text head); greedy `generate`.
* `HFGrounding`: `AutoProcessor` + `AutoModelForZeroShotObjectDetection` (Grounding DINO);
  one query per (image, phrase), post-processed here (score = max sigmoid over the
  phrase's tokens, thresholds, NMS).
* `HFVerifier`: `AutoTokenizer` + `AutoModelForCausalLM` (LLaMA-3, Qwen2, ...): match
  probability from the next-token logits of "yes" vs "no"; rewriting by greedy `generate`.

Prompts are config; when the processor/tokenizer has a chat template it is used.
"""
from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from chatrex_jax.ops import boxes as box_ops
from chatrex_jax.ops.nms import nms
from data_engine.backends.base import Box, GroundingBackend, VerifierBackend, VisionLanguageBackend

CAPTION_PROMPT = "Describe this image in detail, naming every visible object."
REGION_PROMPT = "Describe the {phrase} in this image region in detail."
VERIFY_PROMPT = ("Phrase: {phrase}\nDescription: {description}\n"
                 "Does the description describe the phrase? Answer yes or no.")
REWRITE_PROMPT = ("Rewrite the description into a short referring expression for the "
                  "{phrase}.\nDescription: {description}\nReferring expression:")


def _check_dir(model_dir: str) -> str:
  if not model_dir or not os.path.isdir(model_dir):
    raise FileNotFoundError(f"model directory {model_dir!r} does not exist: the engine loads "
                            "models from local directories only (download them first)")
  return model_dir


def _dir_version(model_dir: str) -> str:
  """`<basename>-<sha1 of config.json>[:8]`: changes when the model changes."""
  h = hashlib.sha1()
  for name in ("config.json", "generation_config.json"):
    path = os.path.join(model_dir, name)
    if os.path.exists(path):
      with open(path, "rb") as f:
        h.update(f.read())
  return f"{os.path.basename(os.path.normpath(model_dir))}-{h.hexdigest()[:8]}"


def _torch_setup(num_threads: int | None):
  import torch
  if num_threads:
    torch.set_num_threads(int(num_threads))
  return torch


def _device(torch, device: str) -> str:
  """"auto" -> "cuda" when a GPU is visible, else "cpu"."""
  if device == "auto":
    return "cuda" if torch.cuda.is_available() else "cpu"
  return device


def _load(backend, name: str, model_dir: str, model_class, preprocessor_class, *, dtype: str,
          device: str, num_threads: int | None):
  """(preprocessor, model in eval mode) from `model_dir`'s local files; sets the backend's name,
  model_dir, version, torch and device."""
  torch = _torch_setup(num_threads)
  backend.torch, backend.device = torch, _device(torch, device)
  backend.model_dir = _check_dir(model_dir)
  backend.name, backend.version = name, _dir_version(model_dir)
  preprocessor = preprocessor_class.from_pretrained(model_dir, local_files_only=True)
  model = model_class.from_pretrained(model_dir, local_files_only=True, dtype=getattr(torch, dtype))
  return preprocessor, model.to(backend.device).eval()


def _to(inputs, device: str, dtype):
  """Move a processor output to `device`; floating tensors (pixels) get the model's dtype."""
  for k, v in list(inputs.items()):
    if hasattr(v, "to"):
      inputs[k] = v.to(device, dtype) if v.is_floating_point() else v.to(device)
  return inputs


def _clean(text: str, max_words: int | None = None) -> str:
  text = " ".join(text.replace("\n", " ").split()).strip(" \"'")
  if max_words:
    text = " ".join(text.split()[:max_words])
  return text


def _chunks(n: int, size: int):
  for i in range(0, n, max(1, size)):
    yield slice(i, min(n, i + size))


class HFVisionLanguage(VisionLanguageBackend):
  """Captioning / region description / VQA with an image-text-to-text model."""

  def __init__(self, model_dir: str, caption_prompt: str = CAPTION_PROMPT,
               region_prompt: str = REGION_PROMPT, max_new_tokens: int = 64,
               min_new_tokens: int = 0, batch_size: int = 4, region_context: float = 0.15,
               dtype: str = "float32", device: str = "auto", num_threads: int | None = None,
               plain_prompt: str = "<image>\n{prompt}", generate_kwargs: dict | None = None):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    self.processor, self.model = _load(self, "hf-vlm", model_dir, AutoModelForImageTextToText,
                                       AutoProcessor, dtype=dtype, device=device, num_threads=num_threads)
    tok = getattr(self.processor, "tokenizer", None)
    if tok is not None:
      tok.padding_side = "left"  # decoder-only generation
    self.caption_prompt, self.region_prompt = caption_prompt, region_prompt
    self.plain_prompt = plain_prompt
    self.batch_size, self.region_context = batch_size, region_context
    self.gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                    do_sample=False, **(generate_kwargs or {}))

  def _prompt(self, text: str) -> str:
    if getattr(self.processor, "chat_template", None):
      msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
      return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return self.plain_prompt.format(prompt=text)

  def _generate(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[str]:
    from PIL import Image
    out: list[str] = []
    for sl in _chunks(len(prompts), self.batch_size):
      pil = [Image.fromarray(im) for im in images[sl]]
      texts = [self._prompt(p) for p in prompts[sl]]
      inputs = _to(self.processor(images=pil, text=texts, return_tensors="pt", padding=True),
                   self.device, self.model.dtype)
      with self.torch.inference_mode():
        ids = self.model.generate(**inputs, **self.gen)
      new = ids[:, inputs["input_ids"].shape[1]:]
      out += [_clean(t) for t in self.processor.batch_decode(new, skip_special_tokens=True)]
    return out

  def caption(self, images, metas):
    return self._generate(list(images), [self.caption_prompt] * len(images))

  def describe_regions(self, images, boxes, phrases, metas):
    crops = [crop(im, b, self.region_context) for im, b in zip(images, boxes)]
    prompts = [self.region_prompt.format(phrase=p) for p in phrases]
    return self._generate(crops, prompts)

  def answer(self, images, questions, metas):
    return self._generate(list(images), list(questions))


def crop(image: np.ndarray, box: Box, context: float = 0.15) -> np.ndarray:
  """The box enlarged by `context` x its size on each side, clipped to the image."""
  h, w = image.shape[:2]
  x1, y1, x2, y2 = box
  dx, dy = (x2 - x1) * context, (y2 - y1) * context
  a, b = int(max(0, np.floor(x1 - dx))), int(max(0, np.floor(y1 - dy)))
  c, d = int(min(w, np.ceil(x2 + dx))), int(min(h, np.ceil(y2 + dy)))
  return np.ascontiguousarray(image[b:max(d, b + 1), a:max(c, a + 1)])


class HFGrounding(GroundingBackend):
  """Grounding DINO (or any zero-shot detector with logits over text tokens + pred_boxes)."""

  def __init__(self, model_dir: str, box_threshold: float = 0.35, max_boxes: int = 10,
               nms_iou: float = 0.5, min_box_px: float = 2.0, batch_size: int = 4,
               dtype: str = "float32", device: str = "auto", num_threads: int | None = None):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor
    self.processor, self.model = _load(self, "hf-grounding", model_dir, AutoModelForZeroShotObjectDetection,
                                       AutoProcessor, dtype=dtype, device=device, num_threads=num_threads)
    self.box_threshold, self.max_boxes, self.nms_iou = box_threshold, max_boxes, nms_iou
    self.min_box_px, self.batch_size = min_box_px, batch_size
    tok = self.processor.tokenizer
    self._ignore = set(tok.all_special_ids) | set(tok.convert_tokens_to_ids([".", ","]))

  def ground(self, images, phrases, metas):
    from PIL import Image
    out: list[list[tuple[Box, float]]] = []
    for sl in _chunks(len(phrases), self.batch_size):
      ims = list(images[sl])
      texts = [p.strip().lower().rstrip(".") + "." for p in phrases[sl]]
      inputs = _to(self.processor(images=[Image.fromarray(im) for im in ims], text=texts,
                                  return_tensors="pt", padding=True), self.device, self.model.dtype)
      with self.torch.inference_mode():
        res = self.model(**inputs)
      logits = res.logits.float().sigmoid().cpu().numpy()          # [B, Q, L]
      pboxes = res.pred_boxes.float().cpu().numpy()                # [B, Q, 4] cxcywh in [0, 1]
      ids = inputs["input_ids"].cpu().numpy()
      mask = inputs["attention_mask"].cpu().numpy().astype(bool)
      for b, im in enumerate(ims):
        h, w = im.shape[:2]
        L = min(logits.shape[2], ids.shape[1])
        tok_mask = mask[b, :L] & ~np.isin(ids[b, :L], list(self._ignore))
        if not tok_mask.any():
          out.append([])
          continue
        scores = logits[b, :, :L][:, tok_mask].max(axis=1)
        scale = np.asarray([w, h, w, h], np.float32)
        boxes = np.clip(box_ops.cxcywh_to_xyxy(pboxes[b]) * scale, 0, [w, h, w, h])  # float64
        ok = ((scores >= self.box_threshold) & (boxes[:, 2] - boxes[:, 0] >= self.min_box_px)
              & (boxes[:, 3] - boxes[:, 1] >= self.min_box_px))
        boxes, scores = boxes[ok], scores[ok]
        keep = nms(boxes, scores, self.nms_iou)[:self.max_boxes]  # float64 boxes: IoU in float64
        out.append([([float(v) for v in boxes[k]], float(scores[k])) for k in keep])
    return out


class HFVerifier(VerifierBackend):
  """An instruction LLM as verifier (yes/no probability) and rewriter (greedy)."""

  def __init__(self, model_dir: str, verify_prompt: str = VERIFY_PROMPT,
               rewrite_prompt: str = REWRITE_PROMPT, yes_words: Sequence[str] = ("yes", "Yes"),
               no_words: Sequence[str] = ("no", "No"), max_new_tokens: int = 24,
               min_new_tokens: int = 0, max_words: int = 16, batch_size: int = 8,
               dtype: str = "float32", device: str = "auto", num_threads: int | None = None,
               generate_kwargs: dict | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    self.tok, self.model = _load(self, "hf-verifier", model_dir, AutoModelForCausalLM, AutoTokenizer,
                                 dtype=dtype, device=device, num_threads=num_threads)
    self.tok.padding_side = "left"
    if self.tok.pad_token is None:
      self.tok.pad_token = self.tok.eos_token
    self.verify_prompt, self.rewrite_prompt = verify_prompt, rewrite_prompt
    self.yes_ids = self._first_ids(yes_words)
    self.no_ids = self._first_ids(no_words)
    if not self.yes_ids or not self.no_ids or set(self.yes_ids) & set(self.no_ids):
      raise ValueError(f"{model_dir}: cannot find distinct yes/no tokens for {yes_words}/{no_words}")
    self.batch_size, self.max_words = batch_size, max_words
    self.gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                    do_sample=False, pad_token_id=self.tok.pad_token_id, **(generate_kwargs or {}))

  def _first_ids(self, words: Sequence[str]) -> list[int]:
    ids = set()
    for w in words:
      for variant in (w, " " + w):
        enc = self.tok.encode(variant, add_special_tokens=False)
        if enc and enc[0] != self.tok.unk_token_id:
          ids.add(enc[0])
    return sorted(ids)

  def _prompt(self, text: str) -> str:
    if getattr(self.tok, "chat_template", None):
      return self.tok.apply_chat_template([{"role": "user", "content": text}],
                                          add_generation_prompt=True, tokenize=False)
    return text

  def _encode(self, prompts: Sequence[str]):
    return self.tok([self._prompt(p) for p in prompts], return_tensors="pt", padding=True,
                    add_special_tokens=not getattr(self.tok, "chat_template", None)).to(self.device)

  def verify(self, phrases, descriptions, metas):
    out: list[float] = []
    for sl in _chunks(len(phrases), self.batch_size):
      prompts = [self.verify_prompt.format(phrase=p, description=d)
                 for p, d in zip(phrases[sl], descriptions[sl])]
      inputs = self._encode(prompts)
      with self.torch.inference_mode():
        logits = self.model(**inputs).logits[:, -1, :].float()   # left padding: last = next
      yes = self.torch.logsumexp(logits[:, self.yes_ids], dim=-1)
      no = self.torch.logsumexp(logits[:, self.no_ids], dim=-1)
      out += [float(v) for v in self.torch.sigmoid(yes - no).cpu().numpy()]
    return out

  def rewrite(self, phrases, descriptions, boxes, metas):
    out: list[str] = []
    for sl in _chunks(len(phrases), self.batch_size):
      prompts = [self.rewrite_prompt.format(phrase=p, description=d)
                 for p, d in zip(phrases[sl], descriptions[sl])]
      inputs = self._encode(prompts)
      with self.torch.inference_mode():
        ids = self.model.generate(**inputs, **self.gen)
      new = ids[:, inputs["input_ids"].shape[1]:]
      out += [_clean(t.split("\n")[0], self.max_words)
              for t in self.tok.batch_decode(new, skip_special_tokens=True)]
    return out

