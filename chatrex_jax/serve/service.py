"""What `chatrex-jax serve` does per request, without the web layer: check the inputs, run the
models loaded once (`models.load_models`), draw and parse the result.

Every input problem is a `RequestError` whose message the page shows as it is (never a stack
trace); problems the models can live with (a downscaled image, boxes partly outside the image,
more than 100 boxes) are answered and listed in `notes`. Box coordinates, given and returned,
are pixels of the picture as shown (after any downscaling).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from PIL import Image

from chatrex_jax.errors import UserError
from chatrex_jax.protocol import prompts
from chatrex_jax.protocol import tokens as C
from chatrex_jax.serve.models import Models

MAX_SIDE = 2048            # longer images are downscaled to this (the models resize far below it)
TASKS = ("detect", "refer", "count", "region_caption", "grounded_caption", "chat")
QUERY_TASKS = ("detect", "refer", "count")
BOX_SOURCES = ("UPN proposals", "my boxes")


class RequestError(UserError):
  """A bad request: the message says what is wrong and what to do, and is shown in the page."""


@dataclasses.dataclass
class Answer:
  image: Image.Image           # the picture with the grounded boxes and their phrases
  answer: str                  # the model's raw answer
  result: dict                 # {"phrases": {phrase: [[x1, y1, x2, y2], ...]}, "boxes", "notes", ...}


def prepare_image(image: Any) -> tuple[Image.Image, float, list[str]]:
  """(RGB picture, scale applied, notes) from an upload: a PIL image, an array or a path."""
  if image is None:
    raise RequestError("No image: upload a picture first.")
  try:
    if isinstance(image, np.ndarray):
      image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
      image = Image.open(image)
      image.load()
  except Exception as e:   # noqa: BLE001 - PIL raises many kinds for a file that is not a picture
    raise RequestError(f"The upload is not an image PIL can read ({type(e).__name__}); upload a "
                       "PNG, JPEG or WebP picture.") from None
  if image.width < 1 or image.height < 1:
    raise RequestError(f"The image is empty ({image.width}x{image.height} pixels); upload a picture.")
  if image.width < 8 or image.height < 8:
    raise RequestError(f"The image is {image.width}x{image.height} pixels; upload one at least 8 "
                       "pixels on each side.")
  image = image.convert("RGB")
  notes, scale = [], 1.0
  if max(image.size) > MAX_SIDE:
    scale = MAX_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    notes.append(f"the {image.width}x{image.height} image was downscaled to {size[0]}x{size[1]} "
                 f"(longest side {MAX_SIDE} px); boxes are in the downscaled picture's pixels")
    image = image.resize(size, Image.BILINEAR)
  return image, scale, notes


def boxes_from_drawing(layers: Sequence[Any] | None, size: tuple[int, int]) -> np.ndarray:
  """The boxes a user painted in the image editor: one box (xyxy pixels) around each connected
  stroke of all layers together, ordered top to bottom, then left to right."""
  from scipy import ndimage
  if not layers:
    return np.zeros((0, 4))
  painted = np.zeros((size[1], size[0]), bool)
  for layer in layers:
    if layer is None:
      continue
    if not isinstance(layer, (Image.Image, np.ndarray)):   # a file path (the web page's upload)
      layer = Image.open(layer)
    a = np.asarray(layer.convert("RGBA") if isinstance(layer, Image.Image) else layer)
    if a.ndim == 3 and a.shape[-1] == 4:
      a = a[..., 3]
    elif a.ndim == 3:
      a = a.max(-1)
    if a.shape[:2] != painted.shape:
      a = np.asarray(Image.fromarray(a.astype(np.uint8)).resize(size, Image.NEAREST))
    painted |= a > 0
  labels, _ = ndimage.label(painted)
  boxes = [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labels) if s]
  boxes = [b for b in boxes if b[2] - b[0] >= 2 and b[3] - b[1] >= 2]   # stray dots are no boxes
  return np.asarray(sorted(boxes, key=lambda b: (b[1], b[0])), np.float64).reshape(-1, 4)


def typed_boxes(text: str, size: tuple[int, int], scale: float) -> np.ndarray:
  """Boxes typed as JSON (`predict.BOXES_FORMAT`, original-image pixels) -> shown-picture pixels;
  a box that misses the picture entirely is an error."""
  from chatrex_jax.inference.predict import parse_boxes
  try:
    boxes, _ = parse_boxes(text, "Boxes")
  except UserError as e:
    raise RequestError(str(e)) from None
  boxes = boxes * scale
  w, h = size
  off = np.flatnonzero((boxes[:, 2] <= 0) | (boxes[:, 3] <= 0) | (boxes[:, 0] >= w) | (boxes[:, 1] >= h))
  if off.size:
    raise RequestError(f"Box {int(off[0])} {np.round(boxes[off[0]], 1).tolist()} lies outside the "
                       f"{w}x{h} image; give [x1, y1, x2, y2] inside it.")
  return boxes


def _draw(image: Image.Image, phrases: Sequence[tuple[str, np.ndarray]]) -> Image.Image:
  from chatrex_jax.inference import visualize
  boxes, labels = [], []
  for phrase, bs in phrases:
    for b in np.asarray(bs).reshape(-1, 4):
      boxes.append(b)
      labels.append(phrase)
  return visualize.draw_boxes(image, np.asarray(boxes).reshape(-1, 4), labels=labels)


class Service:
  """Both demos on models loaded once; jitted functions are reused across requests."""

  def __init__(self, models: Models, *, max_new_tokens: int = 256):
    self.models = models
    self.max_new_tokens = max_new_tokens

  def _need(self, which: str):
    model = getattr(self.models, which)
    if model is None:
      name = {"upn": "UPN", "chatrex": "ChatRex"}[which]
      hint = next((p for p in self.models.problems if p.startswith(f"no {name} model")),
                  f"no {name} model: restart with --checkpoint / --upn")
      raise RequestError(f"This server has {hint}.")
    return model

  def warm_up(self) -> None:
    """Compiles the request path once, on a blank picture, so the first user does not wait."""
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    if self.models.upn is not None:
      for prompt_type in ("fine", "coarse"):
        self.propose(blank, prompt_type)
    if self.models.chatrex is not None:
      self.models.chatrex.run(blank, "detect", boxes=np.array([[8.0, 8.0, 40.0, 40.0]]),
                              objects="thing", max_new_tokens=2)

  # -- UPN ----------------------------------------------------------------------------------------

  def proposals(self, image: Image.Image, prompt_type: str, min_score: float, nms: float):
    upn = self._need("upn")
    if prompt_type not in ("fine", "coarse"):
      raise RequestError(f"UPN prompt must be 'fine' or 'coarse', got {prompt_type!r}.")
    if not 0.0 <= float(min_score) <= 1.0:
      raise RequestError(f"Score threshold {min_score} is outside [0, 1].")
    kept = upn.filter(upn([image], prompt_type), min_score=float(min_score),
                      nms_iou=float(nms) if nms and float(nms) > 0 else None)[0]
    return np.asarray(kept.boxes, np.float64).reshape(-1, 4), np.asarray(kept.scores, np.float64)

  def propose(self, image: Any, prompt_type: str = "fine", min_score: float = 0.3,
              nms: float = 0.8) -> tuple[Image.Image, dict]:
    """UPN tab: the proposals of one prompt, drawn with their scores."""
    from chatrex_jax.inference import visualize
    picture, _, notes = prepare_image(image)
    boxes, scores = self.proposals(picture, prompt_type, min_score, nms)
    drawn = visualize.draw_boxes(picture, boxes, scores=scores)
    return drawn, {"prompt": prompt_type, "boxes": np.round(boxes, 2).tolist(),
                   "scores": np.round(scores, 4).tolist(), "notes": notes}

  # -- ChatRex ------------------------------------------------------------------------------------

  def answer(self, image: Any, task: str, *, query: str = "", granularity: str | None = None,
             question: str = "", raw_question: bool = False, box_source: str = "UPN proposals",
             boxes_json: str = "", drawn_layers: Sequence[Any] | None = None,
             prompt_type: str | None = None, min_score: float = 0.3, nms: float = 0.8) -> Answer:
    """ChatRex tab: one task on one picture, the boxes from UPN or from the user."""
    pipe = self._need("chatrex")
    if task not in TASKS:
      raise RequestError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    picture, scale, notes = prepare_image(image)
    query, question = (query or "").strip(), (question or "").strip()
    if task in QUERY_TASKS and not query:
      raise RequestError(f"The {task} task needs categories or an expression, e.g. 'dog,cat' or "
                         "'the man in red'.")
    if task == "chat" and not question:
      raise RequestError("The question is empty: type what you want to ask about the image.")
    if task == "region_caption" and box_source != "my boxes":
      raise RequestError("Region captions describe your boxes: choose 'my boxes' and draw boxes on "
                         "the image or type them as JSON.")
    scores = None
    if box_source == "my boxes":
      boxes = typed_boxes(boxes_json, picture.size, scale) if boxes_json.strip() else \
          boxes_from_drawing(drawn_layers, picture.size)
      if not len(boxes):
        raise RequestError("No boxes: draw rectangles on the image or type them as JSON, e.g. "
                           "[[10, 20, 200, 180]].")
    elif box_source == "UPN proposals":
      boxes, scores = self.proposals(picture, prompt_type or ("coarse" if task == "chat" else "fine"),
                                     min_score, nms)
    else:
      raise RequestError(f"Boxes come from {' or '.join(BOX_SOURCES)}, not {box_source!r}.")
    from chatrex_jax.inference.predict import report_boxes
    notes += report_boxes(boxes, scores, picture.width, picture.height, C.MAX_NUM_OBJECTS)
    kept = min(len(boxes), C.MAX_NUM_OBJECTS)
    objects = None
    if task == "region_caption":
      objects = list(range(kept)) if not query else self._indices(query, kept)
    elif task in QUERY_TASKS:
      objects = prompts.join_query(query)
    try:
      pred = pipe.run(picture, task, boxes=boxes, scores=scores, objects=objects,
                      granularity=granularity or None, text=question or None, raw_question=raw_question,
                      max_new_tokens=self.max_new_tokens)
    except ValueError as e:   # the prompt builder's checks (granularity, object list)
      raise RequestError(str(e)) from None
    phrases = [(p.phrase, np.asarray(p.boxes).reshape(-1, 4)) for p in pred.parsed.phrases]
    grouped: dict[str, list] = {}
    for phrase, bs in phrases:
      grouped.setdefault(phrase, []).extend(np.round(bs, 2).tolist())
    result = {"task": task, "question": pred.question, "answer": pred.answer, "phrases": grouped,
              "boxes": np.round(pred.boxes, 2).tolist(), "notes": notes + list(pred.notes)}
    return Answer(_draw(picture, phrases), pred.answer, result)

  @staticmethod
  def _indices(query: str, count: int) -> list[int]:
    try:
      indices = prompts.region_indices(query)
    except ValueError as e:
      raise RequestError(f"Regions: {e}") from None
    bad = [i for i in indices if i >= count]
    if bad:
      raise RequestError(f"Regions {bad} do not exist: there are {count} boxes (<obj0>..<obj{count - 1}>).")
    return indices
