"""Awkward test inputs for the engine (used by tests and benchmarks; no pytest here)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from data_engine import synthetic


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
  """A PNG whose IHDR claims w x h pixels, followed by a few bytes of junk pixel data."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
          + chunk(b"IEND", b""))


def scene_png(index=0, size=64):
  return synthetic.render_png(synthetic.make_scene(0, index, size))


def bad_images() -> dict[str, bytes]:
  """name -> bytes of the awkward inputs every stage must survive."""
  rgb = np.asarray(synthetic.render(synthetic.make_scene(0, 1, 64)))
  jpeg = encode(Image.fromarray(rgb), "JPEG", quality=90)
  g16 = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
  return {
      "corrupt": b"this is not an image at all",
      "truncated": jpeg[: len(jpeg) // 2],
      "cmyk": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
      "gray16": encode(Image.fromarray(g16), "PNG"),
      "one_pixel": encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
      "bomb_header": png_header_only(20000, 20000),
      "empty": b"",
  }
