"""UPN inference: official preprocessing, batched jitted forward, post-processing and filtering.

Mirrors `UPNWrapper` of the official repo (docs/architecture.md A.1, A.10) with two deliberate differences:
* images are converted to RGB first (the wrapper does not, which breaks on L/RGBA/P images);
* `filter` returns a result for every image (the official loop returns early at the first
  image that keeps no box, dropping it and every later image).

Batching. Images of different sizes are zero-padded bottom/right to the largest H and W and
a padding mask is passed to the model, exactly like `nested_tensor_from_tensor_list`. The
deformable transformer honours the mask, but Swin does not: its window attention and
PatchMerging see the zero padding as ordinary tokens, GroupNorm statistics include padded
pixels, and the level-4 conv reads across the border. A padded image therefore gets slightly
different proposals than the same image run alone (the official code has the same property;
docs/architecture.md E.7). For parity with single-image runs, call with one image at a time (each new
size compiles once). The forward is jitted per (batch shape, prompt types).
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from chatrex_jax.models.upn.upn import PROMPT_TYPES, UPN, UPNConfig
from chatrex_jax.ops.nms import nms

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- preprocessing
def resize_size(w: int, h: int, size: int = 800, max_size: int | None = 1333) -> tuple[int, int]:
  """DETR's get_size_with_aspect_ratio: returns the new (h, w)."""
  if max_size is not None:
    mn, mx = float(min(w, h)), float(max(w, h))
    if mx / mn * size > max_size:
      size = int(round(max_size * mn / mx))
  if (w <= h and w == size) or (h <= w and h == size):
    return h, w
  if w < h:
    return int(size * h / w), size
  return size, int(size * w / h)


def load_image(image: str | pathlib.Path | Image.Image | np.ndarray) -> Image.Image:
  """A path, PIL image or uint8 HWC array -> RGB PIL image."""
  if isinstance(image, (str, pathlib.Path)):
    from chatrex_jax.protocol.image import ImageInputError
    try:
      with Image.open(image) as im:
        im.load()
        image = im.copy()
    except FileNotFoundError as e:
      raise ImageInputError(f"image {str(image)!r}: file not found; check the path") from e
    except OSError as e:   # not an image, truncated, a folder
      raise ImageInputError(f"image {str(image)!r}: not a readable image ({e}); give a complete "
                            "image file PIL can open (JPEG, PNG, WebP, ...)") from e
  elif isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise ValueError(f"array images must be uint8 HW or HWC, got {image.dtype} {image.shape}")
    image = Image.fromarray(image)
  elif not isinstance(image, Image.Image):
    raise TypeError(f"image must be a path, a PIL image or a uint8 array, got {type(image).__name__}")
  return image if image.mode == "RGB" else image.convert("RGB")


def preprocess(image, size: int = 800, max_size: int = 1333) -> tuple[np.ndarray, tuple[int, int]]:
  """UPNWrapper.transform_image: resize (PIL bilinear), /255, ImageNet normalise.

  returns (float32 [h, w, 3] normalised NHWC image, original (H, W)).
  """
  img = load_image(image)
  w, h = img.size
  oh, ow = resize_size(w, h, size, max_size)
  if (oh, ow) != (h, w):
    img = img.resize((ow, oh), Image.BILINEAR)
  x = np.asarray(img, np.uint8).astype(np.float32) / np.float32(255)
  x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
  return x, (h, w)


def pad_batch(images: Sequence[np.ndarray], multiple: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """nested_tensor_from_tensor_list: [h_i, w_i, 3] -> ([B, H, W, 3] zero padded, mask [B, H, W]
  True on padding). multiple: round H and W up to it (a server's fixed shape buckets; padding
  is masked, but the encoder's valid ratios see it, so outputs differ slightly from unpadded)."""
  hmax = max(x.shape[0] for x in images)
  wmax = max(x.shape[1] for x in images)
  if multiple:
    hmax, wmax = -(-hmax // multiple) * multiple, -(-wmax // multiple) * multiple
  batch = np.zeros((len(images), hmax, wmax, 3), np.float32)
  mask = np.ones((len(images), hmax, wmax), bool)
  for i, x in enumerate(images):
    batch[i, :x.shape[0], :x.shape[1]] = x
    mask[i, :x.shape[0], :x.shape[1]] = False
  return batch, mask


# ----------------------------------------------------------------------------- forward
ENCODER_OUTPUTS = ("src_flatten", "lvl_pos_embed_flatten", "mask_flatten", "valid_ratios", "memory")


@functools.lru_cache(maxsize=None)
def _jitted(model: UPN, prompt_types: tuple[str, ...], full: bool):
  def fwd(params, images, mask):
    enc = model.apply({"params": params}, images, mask, method=UPN.encode)
    out: dict[str, Any] = {}
    if full:
      out.update({k: enc[k] for k in ENCODER_OUTPUTS})
      out["backbone_feats"] = enc["backbone_feats"]
    for pt in prompt_types:
      dec = model.apply({"params": params}, enc, pt, method=UPN.decode)
      out[pt] = dec if full else {k: dec[k] for k in ("pred_logits", "pred_boxes")}
    return out
  return jax.jit(fwd)


def forward(model: UPN, params, images, mask=None, prompt_types: Iterable[str] = ("fine_grained_prompt",),
            full: bool = False) -> dict[str, Any]:
  """Jitted UPN forward sharing one encoder pass between prompt types.

  images [B, H, W, 3] float32 normalised; mask [B, H, W] bool (True = padding) or None.
  returns {prompt_type: {pred_logits [B, Q, 1], pred_boxes [B, Q, 4], ...}} plus, with
  full=True, every intermediate of `UPN.encode`/`UPN.decode` (numpy arrays).
  """
  images = jnp.asarray(images, jnp.float32)
  if mask is None:
    mask = jnp.zeros(images.shape[:3], bool)
  out = _jitted(model, tuple(prompt_types), full)(params, images, jnp.asarray(mask, bool))
  return jax.tree_util.tree_map(np.asarray, out)


# ----------------------------------------------------------------------------- post-processing
@dataclasses.dataclass
class UPNResult:
  """Proposals of a batch, sorted by descending score per image.

  boxes: float32 [B, Q, 4] xyxy in pixels of each original image (unclipped).
  scores: float32 [B, Q] sigmoid scores.
  """
  boxes: np.ndarray
  scores: np.ndarray


@dataclasses.dataclass
class Proposals:
  """Filtered proposals of one image: int32 [K, 4] xyxy pixel boxes, float32 [K] scores
  (rounded to 2 decimals), sorted by descending score."""
  boxes: np.ndarray
  scores: np.ndarray


def postprocess(pred_boxes: np.ndarray, pred_logits: np.ndarray,
                sizes_hw: Sequence[tuple[int, int]]) -> UPNResult:
  """UPNWrapper.postprocess in float32: cxcywh -> xyxy (x1 = x0 + w, as the official in-place
  update), scaled by each ORIGINAL image's W and H, sorted by descending score."""
  boxes = np.asarray(pred_boxes, np.float32)
  scores = np.asarray(jax.nn.sigmoid(jnp.asarray(pred_logits, jnp.float32)))[..., 0]
  if len(sizes_hw) != boxes.shape[0]:
    raise ValueError(f"{len(sizes_hw)} image sizes for a batch of {boxes.shape[0]}")
  out_b, out_s = [], []
  for b, (h, w) in enumerate(sizes_hw):
    # Not box_ops.cxcywh_to_xyxy: x1 = x0 + w rounds differently from cx + w / 2 in float32.
    cx, cy, bw, bh = boxes[b].T
    x0 = cx - bw / np.float32(2)
    y0 = cy - bh / np.float32(2)
    xyxy = np.stack([x0 * np.float32(w), y0 * np.float32(h), (x0 + bw) * np.float32(w),
                     (y0 + bh) * np.float32(h)], -1)
    order = np.argsort(-scores[b], kind="stable")
    out_b.append(xyxy[order])
    out_s.append(scores[b][order])
  return UPNResult(np.stack(out_b), np.stack(out_s))


def filter_image(boxes: np.ndarray, scores: np.ndarray, min_score: float = 0.3,
                 nms_iou: float | None = 0.8) -> Proposals:
  """One image of UPNWrapper.filter: score >= min_score, NMS (IoU > nms_iou suppressed; None
  or <= 0 disables it), int32 truncation, sort by score, round scores to 2 decimals."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  scores = np.asarray(scores, np.float32).reshape(-1)
  keep = scores >= min_score
  boxes, scores = boxes[keep], scores[keep]
  if nms_iou is not None and nms_iou > 0 and len(boxes):
    idx = nms(boxes, scores, nms_iou)
    boxes, scores = boxes[idx], scores[idx]
  boxes = boxes.astype(np.int32)
  order = np.argsort(scores)[::-1]   # the official call, ties included
  boxes, scores = boxes[order], scores[order]
  rounded = np.asarray([round(s, 2) for s in scores], np.float32)  # np.float32.__round__
  return Proposals(boxes.reshape(-1, 4), rounded.reshape(-1))


def filter_result(result: UPNResult, min_score: float = 0.3, nms_iou: float | None = 0.8) -> list[Proposals]:
  """UPNWrapper.filter for every image of the batch (no early return)."""
  return [filter_image(b, s, min_score, nms_iou) for b, s in zip(result.boxes, result.scores)]


# ----------------------------------------------------------------------------- predictor
class UPNPredictor:
  """Loads UPN once and proposes boxes for images (paths, PIL images or uint8 arrays).

    upn = UPNPredictor.from_checkpoint("upn_large.pth")
    result = upn(["a.jpg", "b.jpg"], "fine")          # UPNResult, batched
    kept = upn.filter(result, min_score=0.3, nms_iou=0.8)
  """

  def __init__(self, params, config: UPNConfig, size: int = 800, max_size: int = 1333,
               batch_bucket: int | None = None, pad_multiple: int | None = None):
    self.params = params
    self.config = config
    self.model = UPN(config)
    self.size, self.max_size = size, max_size  # the official resize; change only for tests
    # Pad batches to a multiple of batch_bucket (repeating the last image) so a dataset's short
    # last batches reuse one compiled forward instead of compiling one per batch size.
    self.batch_bucket = batch_bucket
    # Pad height and width up to a multiple of this (`pad_batch`): a server sees few shapes.
    self.pad_multiple = pad_multiple

  @classmethod
  def from_checkpoint(cls, path, config: UPNConfig | None = None, **kw) -> "UPNPredictor":
    from chatrex_jax.convert import upn as convert_upn
    config = config or UPNConfig()
    params, report = convert_upn.load(path, config)
    if report.unexpected or report.filled or report.extras:
      print(f"UPN checkpoint {path}: {report}")
    return cls(params, config, **kw)

  def __call__(self, images, prompt_type: str = "fine") -> UPNResult:
    if prompt_type not in PROMPT_TYPES:
      raise ValueError(f"prompt_type must be one of {sorted(PROMPT_TYPES)}, got {prompt_type!r}")
    if not isinstance(images, (list, tuple)):
      images = [images]
    prepped = [preprocess(im, self.size, self.max_size) for im in images]
    n = len(prepped)
    if self.batch_bucket and n % self.batch_bucket:
      prepped += [prepped[-1]] * (self.batch_bucket - n % self.batch_bucket)
    batch, mask = pad_batch([x for x, _ in prepped], self.pad_multiple)
    out = forward(self.model, self.params, batch, mask, (prompt_type,))[prompt_type]
    return postprocess(out["pred_boxes"][:n], out["pred_logits"][:n], [hw for _, hw in prepped[:n]])

  @staticmethod
  def filter(result: UPNResult, min_score: float = 0.3, nms_iou: float | None = 0.8) -> list[Proposals]:
    return filter_result(result, min_score, nms_iou)
