"""Stage 1: safe decoding and filters, one item at a time (data_engine/filters.py, stages)."""
import base64
import time

import numpy as np
from PIL import Image
import pytest

from data_engine import filters, stages, synthetic
from data_engine.testing import bad_images, encode, png_header_only, scene_png


def test_decode_bad_images_one_by_one():
  imgs = bad_images()
  with pytest.raises(filters.ImageError) as e:
    filters.decode_image(imgs["corrupt"])
  assert e.value.reason == "corrupt"
  with pytest.raises(filters.ImageError) as e:
    filters.decode_image(imgs["truncated"])
  assert e.value.reason == "truncated"
  with pytest.raises(filters.ImageError) as e:
    filters.decode_image(imgs["empty"])
  assert e.value.reason == "empty"

  cmyk = filters.decode_image(imgs["cmyk"])
  assert cmyk.mode == "CMYK" and cmyk.rgb.shape == (64, 64, 3) and cmyk.rgb.dtype == np.uint8
  # the CMYK round trip keeps the colours close to the RGB original (JPEG-lossy)
  ref = np.asarray(synthetic.render(synthetic.make_scene(0, 1, 64)), np.float32)
  assert np.abs(cmyk.rgb.astype(np.float32) - ref).mean() < 12

  g = filters.decode_image(imgs["gray16"])
  assert g.mode.startswith("I") and g.rgb.shape == (48, 64, 3)
  src = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
  np.testing.assert_array_equal(g.rgb[..., 0], np.round(src / 257.0).astype(np.uint8))
  assert g.rgb.max() > 200  # rescaled, not clipped to white / crushed to black

  one = filters.decode_image(imgs["one_pixel"])
  assert (one.width, one.height) == (1, 1)


def test_size_guard_checks_the_header_before_decoding():
  t = time.perf_counter()
  with pytest.raises(filters.ImageError) as e:
    filters.decode_image(bad_images()["bomb_header"])
  assert e.value.reason == "too_large"
  # below PIL's own bomb limit but above ours: our header check is what refuses it
  with pytest.raises(filters.ImageError, match="header says 9000x9000"):
    filters.decode_image(png_header_only(9000, 9000), max_pixels=64_000_000)
  assert time.perf_counter() - t < 1.0  # nothing was decoded


def test_low_content_classifier():
  clf = filters.ImageStatsClassifier()
  white = np.full((100, 120, 3), 255, np.uint8)
  assert clf(white)[0]
  almost = white.copy()
  almost[::7, ::7] = 250  # faint texture, still near-uniform
  assert clf(almost)[0]
  for i in range(20):  # every synthetic scene has enough content
    assert not clf(np.asarray(synthetic.render(synthetic.make_scene(0, i, 128))))[0], i
  noise = np.random.RandomState(0).randint(0, 255, (50, 50, 3), np.uint8)
  assert not clf(noise)[0]
  assert filters.build_low_content({"kind": "none"}) is None
  custom = filters.build_low_content({"kind": "data_engine.filters:ImageStatsClassifier",
                                      "min_std": 1000.0})
  assert custom(noise)[0]


def test_stage_load_handles_every_item_without_raising():
  items = []
  for name, data in bad_images().items():
    ref = {"key": name.replace("_", "-"), "source": "t", "item_id": name, "meta": {},
           "load": {"kind": "inline", "b64": base64.b64encode(data).decode()}}
    items.append(stages.new_item(ref, 0))
  ok_ref = {"key": "good", "source": "t", "item_id": "good", "meta": {},
            "load": {"kind": "inline", "b64": base64.b64encode(scene_png()).decode()}}
  nsfw_ref = dict(ok_ref, key="nsfw", meta={"nsfw": "true"})
  white_png = encode(Image.new("RGB", (80, 80), "white"), "PNG")
  white_ref = dict(ok_ref, key="white", load={"kind": "inline", "b64": base64.b64encode(white_png).decode()})
  missing = dict(ok_ref, key="missing", load={"kind": "file", "path": "/nonexistent/x.png"})
  items += [stages.new_item(r, 0) for r in (ok_ref, nsfw_ref, white_ref, missing)]
  f = filters.ImageFilter(filters.FilterConfig(min_side=16))
  stages.stage_load(items, f)
  got = {it["item_id"] if it["key"] not in ("nsfw", "white", "missing") else it["key"]:
         (it["status"], it["reason"]) for it in items}
  assert got == {
      "corrupt": ("error", "corrupt"), "truncated": ("error", "truncated"),
      "cmyk": ("ok", ""), "gray16": ("ok", ""), "one_pixel": ("dropped", "too_small"),
      "bomb_header": ("error", "too_large"), "empty": ("error", "empty"),
      "good": ("ok", ""), "nsfw": ("dropped", "nsfw"), "white": ("dropped", "low_content"),
      "missing": ("error", "unreadable"),
  }
  for it in items:
    if it["status"] == "ok":
      assert it["rgb"].dtype == np.uint8 and it["passed"] == ["load", "filter"]
    else:
      assert "rgb" not in it
