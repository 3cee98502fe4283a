"""SYNTHETIC SCENES generator (data_engine/synthetic.py): deterministic, learnable, exact."""
import time

import numpy as np
import pytest

from data_engine import synthetic


def test_deterministic_by_seed_and_index():
  a = synthetic.render_png(synthetic.make_scene(3, 7))
  assert a == synthetic.render_png(synthetic.make_scene(3, 7))
  assert a != synthetic.render_png(synthetic.make_scene(3, 8))
  assert a != synthetic.render_png(synthetic.make_scene(4, 7))


@pytest.mark.parametrize("size", [128, 256])
def test_scenes_are_well_formed(size):
  for i in range(60):
    scene = synthetic.make_scene(0, i, size)
    objs = scene["objects"]
    assert 2 <= len(objs) <= 6
    triples = {(o["size"], o["color"], o["shape"]) for o in objs}
    assert len(triples) == len(objs)  # referring expressions can always disambiguate
    for a in objs:
      x1, y1, x2, y2 = a["box"]
      assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
      for b in objs:
        if a is not b:  # well separated: no overlap, a gap of >= 2 px
          assert synthetic._separated(a["box"], b["box"], 2)
      if a["part"]:
        p = a["part"]["box"]
        assert x1 < p[0] < p[2] < x2 and y1 < p[1] < p[3] < y2


def test_boxes_are_the_exact_pixel_extent_of_each_shape():
  for i in range(25):
    scene = synthetic.make_scene(1, i, 128)
    rgb = np.asarray(synthetic.render(scene)).astype(int)
    for o in scene["objects"]:
      x1, y1, x2, y2 = o["box"]
      region = rgb[y1:y2, x1:x2]
      mask = (np.abs(region - synthetic.COLORS[o["color"]]).sum(-1) == 0)
      ys, xs = np.nonzero(mask)
      # the shape's pixels lie in its box and touch (within 1 px) all four sides
      assert xs.min() <= 1 and ys.min() <= 1, (i, o)
      assert xs.max() >= x2 - x1 - 2 and ys.max() >= y2 - y1 - 2, (i, o)
      if o["part"]:
        px1, py1, px2, py2 = o["part"]["box"]
        assert (rgb[(py1 + py2) // 2, (px1 + px2) // 2] == 255).all()
    # outside every box the image is plain background
    outside = np.ones(rgb.shape[:2], bool)
    for o in scene["objects"]:
      x1, y1, x2, y2 = o["box"]
      outside[y1:y2, x1:x2] = False
    assert (rgb[outside] == synthetic.BACKGROUND).all()


def test_referring_expressions_name_exactly_one_object():
  for i in range(80):
    scene = synthetic.make_scene(2, i)
    exprs = [synthetic.referring_expression(scene, o["id"]) for o in scene["objects"]]
    assert len(set(exprs)) == len(exprs)
    for o, e in zip(scene["objects"], exprs):
      words = e.split()[1:]  # drop "the"
      matches = [p for p in scene["objects"]
                 if all(w in (p["size"], p["color"], p["shape"]) for w in words)]
      assert matches == [o], (e, scene)
      if o["part"]:
        assert synthetic.referring_expression(scene, o["id"], part=True) == f"the dot on {e}"


def test_language_mentions_every_object():
  scene = synthetic.make_scene(0, 5)
  cap = synthetic.caption(scene)
  for o in scene["objects"]:
    assert synthetic.object_phrase(o) in cap
    assert synthetic.object_phrase(o) in synthetic.describe(scene, o["id"])
  boxes, labels = synthetic.scene_arrays(scene)
  assert boxes.shape == (len(labels), 4)


def test_fast():
  t = time.perf_counter()
  for i in range(100):
    synthetic.render_png(synthetic.make_scene(0, i, 128))
  assert (time.perf_counter() - t) / 100 < 0.02  # ~1 ms on one core
