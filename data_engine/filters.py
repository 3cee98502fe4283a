"""Stage 1b: safe image decoding and the image filters.

`decode_image` never trusts the file: the header is read first (PIL opens lazily) and an
image whose header claims more than `max_pixels` pixels is refused before any pixel is
decoded (decompression-bomb guard); truncated or corrupt data, unknown formats and odd
modes are reported as `ImageError(reason)` instead of raising out of the pipeline. CMYK,
palette, alpha and 16-bit/float images are converted to 8-bit RGB (16-bit values are
rescaled, not clipped). Boxes are expressed in the decoded pixel frame: EXIF orientation
is not applied, exactly like a plain `PIL.Image.open(...).convert("RGB")` reader.

Filters (each returns a drop reason or None):
* `min_side`: drop images whose shorter side is below the threshold (reason `too_small`).
* NSFW: drop items whose manifest field (default `nsfw`) is truthy (reason `nsfw`).
* low content: `ImageStatsClassifier` below (reason `low_content`), or any object with
  `__call__(rgb uint8 [H, W, 3]) -> (is_low: bool, score: float)` named in the config as
  "module:Class" (e.g. a model-based classifier).
"""
from __future__ import annotations

import dataclasses
import importlib
import io
from typing import Any
import warnings

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 64_000_000


class ImageError(Exception):
  """A per-item image problem; `reason` is a short machine-readable code."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass
class DecodedImage:
  rgb: np.ndarray      # uint8 [H, W, 3]
  width: int
  height: int
  format: str          # PIL format name of the encoded bytes ("PNG", "JPEG", ...)
  mode: str            # the original PIL mode ("RGB", "CMYK", "I;16", ...)


def read_header(data: bytes) -> tuple[int, int, str]:
  """(width, height, format) from the header only; raises ImageError('corrupt')."""
  if not data:
    raise ImageError("empty", "no bytes")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      with Image.open(io.BytesIO(data)) as im:
        return im.size[0], im.size[1], im.format or "unknown"
  except Image.DecompressionBombError as e:
    raise ImageError("too_large", str(e)) from None
  except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
    raise ImageError("corrupt", f"{type(e).__name__}: {e}") from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
  """Decode bytes to RGB uint8 after checking the header's size against `max_pixels`."""
  width, height, fmt = read_header(data)
  if width < 1 or height < 1:
    raise ImageError("corrupt", f"header size {width}x{height}")
  if width * height > max_pixels:
    raise ImageError("too_large", f"header says {width}x{height} > max_pixels={max_pixels}")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      with Image.open(io.BytesIO(data)) as im:
        mode = im.mode
        im.load()
        rgb = to_rgb(im)
  except ImageError:
    raise
  except Exception as e:  # noqa: BLE001
    reason = "truncated" if "truncated" in str(e).lower() or isinstance(e, (OSError, SyntaxError)) else "corrupt"
    raise ImageError(reason, f"{type(e).__name__}: {e}") from None
  if rgb.shape[:2] != (height, width):
    raise ImageError("corrupt", f"decoded {rgb.shape[1]}x{rgb.shape[0]} != header {width}x{height}")
  return DecodedImage(rgb, width, height, fmt, mode)


def to_rgb(im: Image.Image) -> np.ndarray:
  """Any PIL mode -> uint8 [H, W, 3]; 16-bit and float images are rescaled to 0..255."""
  mode = im.mode
  if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
    a = np.asarray(im, dtype=np.float64)
    if mode == "F":
      lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
      a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    else:
      a = a / 257.0  # 16-bit range (PIL stores 16-bit PNGs as mode I) -> 8-bit
    g = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)
  if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
  if mode != "RGB":
    im = im.convert("RGB")  # CMYK, YCbCr, L, 1, P, LAB, HSV
  return np.asarray(im, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class ImageStatsClassifier:
  """Low-content detector from image statistics (no model).

  The image is reduced to a 64x64 thumbnail. It is "low content" when the grey-level
  standard deviation is below `min_std`, or when fewer than `min_foreground` of the pixels
  differ from the dominant (median) colour by more than `tol` in any channel (a
  near-uniform or plain-white page). The score returned is the foreground fraction.
  """
  min_std: float = 4.0
  min_foreground: float = 0.01
  tol: int = 24

  def __call__(self, rgb: np.ndarray) -> tuple[bool, float]:
    thumb = np.asarray(Image.fromarray(rgb).resize((64, 64), Image.BILINEAR), dtype=np.int16)
    grey = thumb.mean(axis=2)
    median = np.median(thumb.reshape(-1, 3), axis=0)
    fg = float((np.abs(thumb - median).max(axis=2) > self.tol).mean())
    return bool(grey.std() < self.min_std or fg < self.min_foreground), fg


def build_low_content(spec: dict[str, Any] | None):
  """Config -> classifier. {"kind": "stats", ...params} or {"kind": "module:Class", ...}."""
  spec = dict(spec or {"kind": "stats"})
  kind = spec.pop("kind", "stats")
  if kind in (None, "none", ""):
    return None
  if kind == "stats":
    return ImageStatsClassifier(**spec)
  module, _, name = kind.partition(":")
  return getattr(importlib.import_module(module), name)(**spec)


def truthy(value: Any) -> bool:
  if isinstance(value, str):
    return value.strip().lower() in ("1", "true", "yes", "y", "nsfw", "unsafe")
  return bool(value)


@dataclasses.dataclass
class FilterConfig:
  min_side: int = 32
  max_pixels: int = DEFAULT_MAX_PIXELS
  nsfw_field: str = "nsfw"
  low_content: dict | None = None


class ImageFilter:
  """The filters of stage 1: `check_meta` before decoding, `check_image` after; each
  returns a drop reason or None."""

  def __init__(self, cfg: FilterConfig):
    self.cfg = cfg
    self.low_content = build_low_content(cfg.low_content)

  def check_meta(self, meta: dict[str, Any]) -> str | None:
    if self.cfg.nsfw_field and truthy(meta.get(self.cfg.nsfw_field, False)):
      return "nsfw"
    return None

  def check_image(self, img: DecodedImage) -> str | None:
    if min(img.width, img.height) < self.cfg.min_side:
      return "too_small"
    if self.low_content is not None and self.low_content(img.rgb)[0]:
      return "low_content"
    return None
