"""Drawing boxes with labels on an image (PIL). Shared by UPN proposals and ChatRex answers."""
from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def palette(n: int) -> list[tuple[int, int, int]]:
  """n well-separated RGB colours (golden-ratio hues), deterministic."""
  out = []
  for i in range(n):
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 0.95)
    out.append((int(r * 255), int(g * 255), int(b * 255)))
  return out


def draw_boxes(image: Image.Image | np.ndarray, boxes, labels: Sequence[str] | None = None,
               scores: Sequence[float] | None = None, colors: Sequence[tuple[int, int, int]] | None = None,
               width: int | None = None) -> Image.Image:
  """Returns a copy of `image` (PIL or uint8 HWC) with xyxy pixel `boxes` [K, 4] drawn.

  labels / scores: optional per box; the caption is "label score" above the box's top-left
  corner (inside the image). Boxes may extend past the image (UPN boxes are unclipped).
  """
  img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
  img = img.convert("RGB").copy()
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  n = len(boxes)
  if labels is not None and len(labels) != n:
    raise ValueError(f"{len(labels)} labels for {n} boxes")
  if scores is not None and len(scores) != n:
    raise ValueError(f"{len(scores)} scores for {n} boxes")
  colors = list(colors) if colors is not None else palette(max(n, 1))
  width = width or max(1, round(min(img.size) / 300))
  draw = ImageDraw.Draw(img)
  font = ImageFont.load_default()
  for i, (x0, y0, x1, y1) in enumerate(boxes):
    color = colors[i % len(colors)]
    draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=color, width=width)
    parts = []
    if labels is not None:
      parts.append(str(labels[i]))
    if scores is not None:
      parts.append(f"{float(scores[i]):.2f}")
    if parts:
      text = " ".join(parts)
      left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
      tw, th = right - left, bottom - top + 2
      tx = int(np.clip(min(x0, x1), 0, max(img.width - tw, 0)))
      ty = int(np.clip(min(y0, y1) - th, 0, max(img.height - th, 0)))
      draw.rectangle([tx, ty, tx + tw, ty + th], fill=color)
      draw.text((tx, ty - top), text, fill=(0, 0, 0), font=font)
  return img
