"""The image side of ChatRex's input: image -> (pixel_values, pixel_values_aux), boxes -> 768 frame.

Reproduces the image half of RexSeek `prepare_input_for_rexseek` (fixture `processor_rexseek`) on
the host with NumPy + PIL, outside `jit`; training data (`data.pipeline`) and inference
(`inference.processor`) both use it. The sizes are openai/clip-vit-large-patch14-336's processor
settings, resized to 768 for the ConvNeXt input by RexSeek's `modify_processor_resolution`; 576
image tokens = 24 x 24 CLIP-L/14 patches at 336 px (= the ConvNeXt-L last stage at 768 px).

Steps:

1. The image is loaded as RGB uint8 (see "Input policy" below), original size (W, H) remembered.
2. `expand2square`: centred on an S x S canvas (S = max(W, H)) filled with (122, 116, 104)
   (`int(255 * clip_mean)`); landscape pasted at (0, (W - H) // 2), portrait at ((H - W) // 2, 0).
3. CLIPImageProcessor semantics at 768: PIL **bicubic** resize (shortest edge 768, then centre
   crop 768 - a no-op for the square), `float32(float64(u8) / 255)`, `(x - mean) / std` in
   float32 -> `pixel_values_aux` [768, 768, 3] (bit-identical to the official uint8 path).
4. `pixel_values` = bilinear resize of the *normalised* 768 tensor to 336, `align_corners=False`,
   no antialias, with PyTorch's CPU index arithmetic reproduced in float32
   (`torch_bilinear_resize`, bit-identical to torch on x86; not `jax.image.resize`, which
   differs by ~3e-4, docs/architecture.md F).
5. Boxes (xyxy, original pixels) -> xywh (float64) -> float32 + pad offset -> * 768 / S ->
   xyxy (float32), exactly the official operation order. Boxes are not clipped.

Layouts: the model takes NHWC, so `ProcessedImage` holds HWC arrays; `.nchw()` gives the
official [1, 3, H, W] layout (the golden fixture compares that one).

Input policy (issue 6; each case is either processed or refused with a message):
  * RGB: as official.  Landscape / portrait / square: as official.
  * Grayscale (L, 1-bit) -> gray replicated into R, G, B. This equals the official *path* branch
    (`Image.open(p).convert("RGB")`); the official *PIL-object* branch raises inside
    expand2square for a non-square mode-L image ("color must be int or single-element tuple").
  * Alpha (RGBA, LA, PA, P with transparency) -> composited onto white, as transformers'
    `convert_to_rgb` does in the official PIL-object branch (the pad stays opaque (122,116,104)).
  * 16-bit (PIL I;16*, I with values <= 65535, uint16 arrays) -> the high byte (v >> 8), the
    rule PIL itself uses for 48-bit RGB PNGs. The official code saturates them (PIL's I -> RGB
    conversion clips at 255), which destroys the image; this is a deliberate difference.
  * EXIF orientation: NOT applied by default (the official code does not, and the boxes given
    to the model must live in the same frame as the pixels, e.g. UPN run on the same decoded
    image). `exif_transpose=True` applies `ImageOps.exif_transpose` first; either way a note
    records an orientation tag other than 1.
  * Tiny images (down to 1 x 1) are processed; empty images are refused; images whose square
    canvas would exceed `max_square_side` are refused (the canvas is materialised).
  * Float images / PIL mode F, unknown channel counts: refused (ambiguous value range).
  * Boxes: at most `max_objects` (100: ChatRex has the object tags <obj0>..<obj99>). With more,
    `box_overflow="truncate"` keeps 100 (`select_boxes`): the first 100 when no scores are given
    - the rule of RexSeek's `evaluate_rexseek.py` (`candidate_boxes[:100]`); the ChatRex-7B
    processor is remote code not in the repositories - or the 100 highest-scoring (kept in input
    order) when scores are given. UPN proposals come sorted by score, so both rules keep the same
    boxes for them. Each such call warns once (`BoxOverflowWarning`) and adds a note naming the
    count and the rule; `"raise"` refuses. Non-finite coordinates or scores are refused.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction
import functools
import os
from typing import Any, Sequence
import warnings

import numpy as np
from PIL import Image, ImageOps

from chatrex_jax.errors import UserError
from chatrex_jax.ops import boxes as box_ops
from chatrex_jax.protocol import tokens as C

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOUR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104): int() truncates
AUX_IMAGE_SIZE = 768
CLIP_IMAGE_SIZE = 336
NUM_IMAGE_TOKENS = 576

ImageInput = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray (H, W[, C]) uint8/uint16


class ImageInputError(UserError, ValueError):
  """An image the processor refuses, with the reason."""


class BoxOverflowWarning(UserWarning):
  """More input boxes than object tags: some were dropped (see `select_boxes`)."""


# ------------------------------------------------------------------------------------------
# Image loading


@dataclasses.dataclass
class LoadedImage:
  """An RGB uint8 image [H, W, 3] and what was done to get it."""
  rgb: np.ndarray
  notes: list[str]

  @property
  def size_wh(self) -> tuple[int, int]:
    return int(self.rgb.shape[1]), int(self.rgb.shape[0])


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_EXIF_ORIENTATION = 0x0112


def _composite_on_white(img: Image.Image) -> Image.Image:
  rgba = img.convert("RGBA")
  background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
  return Image.alpha_composite(background, rgba).convert("RGB")


def _array_to_rgb(a: np.ndarray, what: str) -> np.ndarray:
  """HW / HWC numpy image -> RGB uint8 HWC (policy in the module docstring)."""
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
    raise ImageInputError(
        f"{what}: expected an array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (channels last), "
        f"got shape {a.shape}")
  if a.dtype == np.bool_:
    a = a.astype(np.uint8) * 255
  elif a.dtype == np.uint16:
    a = (a >> 8).astype(np.uint8)
  elif a.dtype != np.uint8:
    raise ImageInputError(
        f"{what}: dtype {a.dtype} is not supported (uint8 or uint16 expected; float images are "
        "refused because their value range is ambiguous - convert to uint8 first)")
  if a.shape[-1] == 4:
    return np.asarray(_composite_on_white(Image.fromarray(a, "RGBA")))
  if a.shape[-1] == 1:
    return np.repeat(a, 3, axis=-1)
  return np.ascontiguousarray(a)


def _pil_to_rgb(img: Image.Image, what: str) -> np.ndarray:
  mode = img.mode
  if mode == "RGB":
    return np.asarray(img)
  if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    a = np.asarray(img)
    if a.size and (a.min() < 0 or a.max() > 65535):
      raise ImageInputError(f"{what}: 32-bit integer image with values outside 0..65535")
    return _array_to_rgb(a.astype(np.uint16), what)
  if mode == "F":
    raise ImageInputError(f"{what}: float image (PIL mode F) refused: value range is ambiguous")
  if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
    return np.asarray(_composite_on_white(img))
  try:
    return np.asarray(img.convert("RGB"))
  except (ValueError, OSError) as e:
    raise ImageInputError(f"{what}: cannot convert PIL mode {mode!r} to RGB: {e}") from e


def load_image(image: ImageInput, *, exif_transpose: bool = False) -> LoadedImage:
  """Loads a path / PIL image / array as an RGB uint8 array [H, W, 3] (policy: module doc)."""
  notes: list[str] = []
  if isinstance(image, (str, os.PathLike)):
    what = f"image {os.fspath(image)!r}"
    try:
      with Image.open(image) as f:
        f.load()
        img = f.copy()
        img.info.update(f.info)
    except FileNotFoundError as e:
      raise ImageInputError(f"{what}: file not found; check the path") from e
    except Image.DecompressionBombError as e:
      raise ImageInputError(f"{what}: {e}") from e
    except OSError as e:
      raise ImageInputError(f"{what}: not a readable image ({e}); give a complete image file "
                            "PIL can open (JPEG, PNG, WebP, ...)") from e
  elif isinstance(image, Image.Image):
    what, img = f"PIL image {image.size} mode {image.mode}", image
  elif isinstance(image, np.ndarray):
    what = f"array {image.shape} {image.dtype}"
    rgb = _array_to_rgb(image, what)
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
      raise ImageInputError(f"{what}: empty image")
    return LoadedImage(rgb, notes)
  else:
    raise ImageInputError(f"unsupported image input {type(image).__name__}: pass a path, a PIL "
                          "image or a uint8 array (H, W[, C])")
  orientation = 1
  try:
    orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
  except Exception:  # broken EXIF blocks must not stop processing
    notes.append("EXIF block unreadable; ignored")
  if orientation != 1:
    if exif_transpose:
      img = ImageOps.exif_transpose(img)
      notes.append(f"EXIF orientation {orientation} applied (exif_transpose=True)")
    else:
      notes.append(f"EXIF orientation {orientation} NOT applied (official behaviour); boxes must "
                   "be in the stored pixel frame. Pass exif_transpose=True to rotate first.")
  if img.width == 0 or img.height == 0:
    raise ImageInputError(f"{what}: empty image")
  return LoadedImage(_pil_to_rgb(img, what), notes)


# ------------------------------------------------------------------------------------------
# Pixel arithmetic


def expand2square(rgb: np.ndarray, background: Sequence[int] = PAD_COLOUR) -> Image.Image:
  """Centred pad to a square, as the official `expand2square`: uint8 [H, W, 3] -> PIL RGB S x S.

  Built as the official does it (a filled PIL canvas and a paste), so the bicubic resize that
  follows reads the canvas without another copy.
  """
  h, w = rgb.shape[:2]
  image = Image.fromarray(rgb, "RGB")
  if w == h:
    return image
  canvas = Image.new("RGB", (max(w, h),) * 2, tuple(int(v) for v in background))
  canvas.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
  return canvas


def clip_preprocess(image: np.ndarray | Image.Image, size: int = AUX_IMAGE_SIZE,
                    mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD) -> np.ndarray:
  """CLIPImageProcessor (shortest_edge=size, crop size x size, PIL bicubic) -> float32 [S, S, 3].

  image: uint8 [H, W, 3] or a PIL RGB image. Same arithmetic as transformers' numpy/PIL path:
  PIL resize of the uint8 image, centre crop (top = (h - size) // 2),
  float32(float64(u8) * (1/255)), (x - float32 mean) / float32 std.
  """
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image, "RGB")
  w, h = image.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  resized = np.asarray(image.resize((new_w, new_h), Image.BICUBIC))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return _normalise(resized[top:top + size, left:left + size], tuple(mean), tuple(std))


def _normalise(pixels: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
  """uint8 [H, W, C] -> float32 [H, W, C] by table lookup (`_normalisation_table`).

  The bytes are read two at a time: a little-endian uint16 holds two consecutive values whose
  channels follow a cycle of three pairs, and one float32 pair per (cycle position, uint16)
  comes from `_pair_table`. Half the lookups of one per value, and no per-value channel offset
  (the offsets repeat with the cycle).
  """
  pixels = np.ascontiguousarray(pixels)
  channels = pixels.shape[-1]
  if pixels.size % 2 or channels != 3:
    table = _normalisation_table(mean, std)
    index = pixels.astype(np.intp)
    index *= channels
    index += np.arange(channels)
    return table.reshape(-1).take(index)
  pairs = pixels.reshape(-1).view("<u2")
  index = np.add(pairs, _pair_offsets(pairs.shape[0]))
  return _pair_table(mean, std).take(index).view(np.float32).reshape(pixels.shape)


@functools.lru_cache(maxsize=8)
def _normalisation_table(mean: tuple, std: tuple) -> np.ndarray:
  """float32 [256, C]: every uint8 level normalised with transformers' arithmetic,
  float32(float64(u8) * (1/255)), then (x - float32 mean) / float32 std. A lookup per pixel
  gives the identical values at a fraction of the cost of computing them per pixel."""
  levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
  return (levels[:, None] - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


@functools.lru_cache(maxsize=8)
def _pair_table(mean: tuple, std: tuple) -> np.ndarray:
  """uint64 [3 * 65536], each item the bytes of two float32 (moved as integers, so no float
  rule can touch them): entry k * 65536 + u holds the
  normalised pair for uint16 u (low byte first) at position k of the three-pair channel cycle
  (k = 0: channels (0, 1); k = 1: (2, 0); k = 2: (1, 2))."""
  table = _normalisation_table(mean, std)
  low, high = np.arange(65536) & 255, np.arange(65536) >> 8
  out = np.empty((3, 65536, 2), np.float32)
  for k in range(3):
    out[k, :, 0] = table[low, (2 * k) % 3]
    out[k, :, 1] = table[high, (2 * k + 1) % 3]
  return out.view(np.uint64).reshape(-1)


@functools.lru_cache(maxsize=2)
def _pair_offsets(num_pairs: int) -> np.ndarray:
  """intp [num_pairs]: 65536 * (the pair's position in the three-pair channel cycle)."""
  offsets = np.tile(np.arange(3, dtype=np.intp) * 65536, num_pairs // 3 + 1)[:num_pairs]
  offsets.flags.writeable = False
  return offsets


def _round_f32(x: Fraction) -> np.float32:
  """Exact rational -> nearest float32 (ties to even): a fused multiply-add's single rounding."""
  v = np.float32(float(x))
  cands = (np.nextafter(v, np.float32(-np.inf)), v, np.nextafter(v, np.float32(np.inf)))
  return min(cands, key=lambda c: (abs(Fraction(float(c)) - x),
                                   int(np.asarray(c).view(np.int32)) & 1))


@functools.lru_cache(maxsize=32)
def _linear_taps(in_size: int, out_size: int):
  """PyTorch CPU `upsample_bilinear2d` (align_corners=False, no scale given) taps, float32.

  scale = float32(in) / out; src = fma(scale, dst + 0.5, -0.5) (x86 builds contract this into
  one FMA, i.e. one rounding - emulated exactly with fractions), clamped at 0; i0 = floor(src)
  (<= in - 1), lambda1 = src - i0 in [0, 1], lambda0 = 1 - lambda1, i1 = min(i0 + 1, in - 1).
  """
  scale = Fraction(float(np.float32(np.float32(in_size) / np.float32(out_size))))
  src = np.array([_round_f32(scale * (Fraction(d) + Fraction(1, 2)) - Fraction(1, 2))
                  for d in range(out_size)], np.float32)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  lam1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
  lam0 = (np.float32(1) - lam1).astype(np.float32)
  i1 = i0 + (i0 < in_size - 1).astype(np.int64)
  return i0, i1, lam0, lam1


def _fma_pair(a, wa, b, wb) -> np.ndarray:
  """float32 `a * wa + b * wb` as PyTorch's compiled kernel evaluates it: fma(a, wa, b * wb)
  (b * wb rounded to float32, then one rounding of the fused sum; float64 is exact enough).
  a, b: float32; wa: float64; wb: float32 (broadcast against a and b)."""
  fused = np.multiply(a, wa, dtype=np.float64)
  fused += np.multiply(b, wb)
  return fused.astype(np.float32)


@functools.lru_cache(maxsize=8)
def _resize_taps(h: int, w: int, c: int, out_h: int, out_w: int):
  """`_linear_taps` of both axes laid out for a [H, W * C] view: the source rows of the top
  taps then of the bottom taps [2 out_h], the source columns [out_w * C] of the left and right
  taps, their weights repeated per channel, and the row weights as columns [out_h, 1]."""
  y0, y1, h0, h1 = _linear_taps(h, out_h)
  x0, x1, w0, w1 = _linear_taps(w, out_w)
  channel = np.arange(c)
  left, right = ((x[:, None] * c + channel).reshape(-1) for x in (x0, x1))
  return (np.concatenate([y0, y1]), left, right, np.repeat(w0.astype(np.float64), c),
          np.repeat(w1, c), h0.astype(np.float64)[:, None], h1[:, None])


def torch_bilinear_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """`F.interpolate(mode="bilinear", align_corners=False, antialias=False)` in numpy, float32.

  x: [H, W, C] (channels last) float32 -> [out_h, out_w, C] float32. Mirrors PyTorch's CPU
  kernel (`upsample_generic_Nd_kernel_impl`, `Interpolate<n, ..., 2>`): taps from
  `_linear_taps`, row interpolation `fma(x0, w0, x1 * w1)` along W, then the same along H.
  Bit-identical to torch 2.13/2.14 on x86 (FMA build); a build without FMA contraction differs
  by float32 rounding only (<= ~5e-7 for CLIP-normalised pixels). Only the 2 out_h source rows
  the taps read are interpolated along W; the [H, W * C] view makes every gather a run of
  single float32 elements, which numpy copies fastest.
  """
  x = np.ascontiguousarray(x, np.float32)
  h, w, c = x.shape
  rows, left, right, w0, w1, h0, h1 = _resize_taps(h, w, c, out_h, out_w)
  source = x.reshape(h, w * c).take(rows, axis=0)                    # [2 out_h, W C]
  across = _fma_pair(source.take(left, axis=1), w0, source.take(right, axis=1), w1)
  return _fma_pair(across[:out_h], h0, across[out_h:], h1).reshape(out_h, out_w, c)


def pad_boxes(boxes_xywh, size_wh: tuple[int, int]) -> np.ndarray:
  """Official `pad_boxes`: float32, x += (H - W) // 2 (portrait/square) or y += (W - H) // 2."""
  b = np.asarray(boxes_xywh).astype(np.float32).reshape(-1, 4)
  w, h = size_wh
  if w > h:
    b[:, 1] += (w - h) // 2
  else:
    b[:, 0] += (h - w) // 2
  return b


def resize_boxes(boxes_xywh, square_side: int, target: int = AUX_IMAGE_SIZE) -> np.ndarray:
  """Official `resize_boxes` for the square: x, y, w, h *= float32(target / S), in float32."""
  b = np.asarray(boxes_xywh).astype(np.float32).reshape(-1, 4)
  return b * np.float32(target / square_side)


def transform_boxes(boxes_xyxy, size_wh: tuple[int, int],
                    target: int = AUX_IMAGE_SIZE) -> np.ndarray:
  """Original-image xyxy boxes -> xyxy in the target x target frame of the squared image.

  Official order and dtypes: xyxy -> xywh in float64; float32 + pad offset (left for portrait,
  top for landscape, integer (|W - H|) // 2); x, y, w, h *= float32(target / max(W, H));
  x2 = x + w in float32. boxes [N, 4] -> float32 [N, 4]. Not clipped.
  """
  # The conversions are the box library's, in the official dtypes: xyxy -> xywh on float64 (the
  # official converts np.array(python floats)), xywh -> xyxy on the float32 of the padding.
  xywh = box_ops.xyxy_to_xywh(np.reshape(boxes_xyxy, (-1, 4)), dtype=np.float64)
  padded = pad_boxes(xywh, size_wh)
  return box_ops.xywh_to_xyxy(resize_boxes(padded, max(size_wh), target)).astype(np.float32)


def boxes_to_original(boxes_768, size_wh: tuple[int, int],
                      target: int = AUX_IMAGE_SIZE) -> np.ndarray:
  """Inverse of `transform_boxes` (float64): 768-frame xyxy -> original-image xyxy."""
  b = np.asarray(boxes_768, np.float64).reshape(-1, 4)
  w, h = size_wh
  s = max(w, h)
  b = b * (s / target)
  off = np.array([0, (w - h) // 2, 0, (w - h) // 2] if w > h else [(h - w) // 2, 0, (h - w) // 2, 0],
                 np.float64)
  return b - off


# ------------------------------------------------------------------------------------------
# Box cap


@dataclasses.dataclass
class BoxSelection:
  """The boxes kept under the object-tag cap.

  boxes: float64 [K, 4] kept boxes (input order); indices: int64 [K] their positions in the
  input; num_given: N; rule: None (nothing dropped), "first" (no scores: the first K, as
  RexSeek's evaluate_rexseek.py) or "highest_score" (the K best scores, ties to the earlier box).
  """
  boxes: np.ndarray
  indices: np.ndarray
  num_given: int
  rule: str | None

  @property
  def num_dropped(self) -> int:
    return self.num_given - int(self.indices.shape[0])

  def note(self) -> str | None:
    """One human-readable line, None when nothing was dropped."""
    if not self.num_dropped:
      return None
    k = int(self.indices.shape[0])
    how = (f"kept the {k} highest-scoring (in input order)" if self.rule == "highest_score" else
           f"kept the first {k}, as RexSeek's evaluate_rexseek.py (give scores to keep the "
           "highest-scoring)")
    return (f"{self.num_dropped} of {self.num_given} boxes dropped (rule {self.rule!r}, "
            f"max_objects={k}; ChatRex has the object tags <obj0>..<obj"
            f"{C.MAX_NUM_OBJECTS - 1}>): {how}")

  def to_dict(self) -> dict:
    return {"given": self.num_given, "kept": int(self.indices.shape[0]),
            "dropped": self.num_dropped, "rule": self.rule}


def select_boxes(boxes, scores=None, max_objects: int = C.MAX_NUM_OBJECTS) -> BoxSelection:
  """Caps boxes [N, 4] at max_objects (rule in the module doc). scores: [N] or None.
  Pure: no warning, no validation beyond shapes (the processor validates first)."""
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  n = b.shape[0]
  if n <= max_objects:
    return BoxSelection(b, np.arange(n, dtype=np.int64), n, None)
  if scores is None:
    idx, rule = np.arange(max_objects, dtype=np.int64), "first"
  else:
    s = np.asarray(scores, np.float64).reshape(-1)
    if s.shape[0] != n:
      raise ValueError(f"{s.shape[0]} scores for {n} boxes")
    # stable sort: among equal scores the earlier box wins; then back to input order
    idx = np.sort(np.argsort(-s, kind="stable")[:max_objects]).astype(np.int64)
    rule = "highest_score"
  return BoxSelection(b[idx], idx, n, rule)


# ------------------------------------------------------------------------------------------
# Processor


@dataclasses.dataclass
class ProcessedImage:
  """One preprocessed image (host numpy arrays, channels last).

  pixel_values: float32 [336, 336, 3] CLIP input.
  pixel_values_aux: float32 [768, 768, 3] ConvNeXt input.
  boxes: float32 [N, 4] xyxy in the 768 frame (N <= max_objects).
  boxes_original: float64 [N, 4] the kept input boxes, xyxy original pixels (for the parser).
  size_wh: original (W, H); square_side: S = max(W, H).
  num_boxes_dropped: boxes beyond max_objects removed by the "truncate" policy.
  notes: what the input policy did (EXIF, alpha, 16-bit, dropped boxes, ...).
  box_selection: which input boxes were kept and by which rule (`BoxSelection`; None when the
  ProcessedImage was built by hand).
  """
  pixel_values: np.ndarray
  pixel_values_aux: np.ndarray
  boxes: np.ndarray
  boxes_original: np.ndarray
  size_wh: tuple[int, int]
  square_side: int
  num_boxes_dropped: int = 0
  notes: list[str] = dataclasses.field(default_factory=list)
  box_selection: BoxSelection | None = None

  def nchw(self) -> dict[str, np.ndarray]:
    """The official layout: pixel_values [1,3,336,336], pixel_values_aux [1,3,768,768],
    gt_boxes [1, N, 4]."""
    return {
        "pixel_values": self.pixel_values.transpose(2, 0, 1)[None],
        "pixel_values_aux": self.pixel_values_aux.transpose(2, 0, 1)[None],
        "gt_boxes": self.boxes[None],
    }


def check_boxes(boxes, scores=None, max_objects: int = C.MAX_NUM_OBJECTS,
                box_overflow: str = "truncate") -> BoxSelection:
  """Validates boxes [N, 4] (xyxy, original pixels) and scores [N]; keeps max_objects of them
  (`select_boxes`) or, with box_overflow="raise", refuses more."""
  if boxes is None or np.asarray(boxes).size == 0:
    return select_boxes(np.zeros((0, 4)), None, max_objects)
  b = np.asarray(boxes, np.float64)
  if b.ndim != 2 or b.shape[1] != 4:
    raise ValueError(f"boxes must be [N, 4] xyxy in original-image pixels, got shape {b.shape}")
  if not np.all(np.isfinite(b)):
    bad = np.argwhere(~np.isfinite(b).all(-1)).ravel().tolist()
    raise ValueError(f"boxes {bad} have non-finite coordinates")
  if scores is not None:
    scores = np.asarray(scores, np.float64).reshape(-1)
    if scores.shape[0] != b.shape[0]:
      raise ValueError(f"{scores.shape[0]} scores for {b.shape[0]} boxes")
    if not np.all(np.isfinite(scores)):
      raise ValueError("scores must be finite")
  if b.shape[0] > max_objects and box_overflow == "raise":
    raise ValueError(f"{b.shape[0]} boxes given, at most max_objects={max_objects} are "
                     "supported (box_overflow='truncate' keeps the first ones, or the "
                     "highest-scoring when scores are given)")
  return select_boxes(b, scores, max_objects)


def preprocess_image(image: ImageInput, boxes=None, scores=None, *, aux_size: int = AUX_IMAGE_SIZE,
                     clip_size: int = CLIP_IMAGE_SIZE, background=PAD_COLOUR, mean=CLIP_MEAN,
                     std=CLIP_STD, max_objects: int = C.MAX_NUM_OBJECTS,
                     box_overflow: str = "truncate", exif_transpose: bool = False,
                     max_square_side: int = 12000) -> ProcessedImage:
  """Image + optional boxes [N, 4] (xyxy, original pixels) and their scores [N] (used only
  to choose which boxes to keep when N > max_objects) -> ProcessedImage."""
  loaded = load_image(image, exif_transpose=exif_transpose)
  w, h = loaded.size_wh
  s = max(w, h)
  if s > max_square_side:
    raise ImageInputError(
        f"image {w}x{h}: its square canvas would be {s}x{s}, above max_square_side="
        f"{max_square_side}; downscale it first (and its boxes) or raise the limit")
  selection = check_boxes(boxes, scores, max_objects, box_overflow)
  aux = clip_preprocess(expand2square(loaded.rgb, background), aux_size, mean, std)
  clip = torch_bilinear_resize(aux, clip_size, clip_size)
  notes = list(loaded.notes)
  note = selection.note()
  if note:
    notes.append(note)
    warnings.warn(note, BoxOverflowWarning, stacklevel=3)
  b = selection.boxes
  return ProcessedImage(pixel_values=clip, pixel_values_aux=aux,
                        boxes=transform_boxes(b, (w, h), aux_size), boxes_original=b,
                        size_wh=(w, h), square_side=s, num_boxes_dropped=selection.num_dropped,
                        notes=notes, box_selection=selection)

def batch_images(images: Sequence[ProcessedImage], max_objects: int = C.MAX_NUM_OBJECTS
                 ) -> dict[str, np.ndarray]:
  """Stacks ProcessedImages: pixel_values [B,336,336,3], pixel_values_aux [B,768,768,3] float32,
  boxes [B, max_objects, 4] float32 (zero rows after the valid ones), box_mask [B, max_objects]
  bool, num_boxes [B] int32."""
  if not images:
    raise ValueError("empty batch")
  n = [im.boxes.shape[0] for im in images]
  if max(n) > max_objects:
    raise ValueError(f"a sample has {max(n)} boxes > max_objects={max_objects}")
  boxes = np.zeros((len(images), max_objects, 4), np.float32)
  mask = np.zeros((len(images), max_objects), bool)
  for i, im in enumerate(images):
    boxes[i, :n[i]] = im.boxes
    mask[i, :n[i]] = True
  return {
      "pixel_values": np.stack([im.pixel_values for im in images]),
      "pixel_values_aux": np.stack([im.pixel_values_aux for im in images]),
      "boxes": boxes,
      "box_mask": mask,
      "num_boxes": np.asarray(n, np.int32),
  }
