"""SYNTHETIC SCENES: a deterministic, procedurally drawn test/demo dataset.

Not real data and never a default for real runs: it exists so the engine, the UPN trainer
and the ChatRex trainer can be tested end to end with known answers.

A scene is 2-6 well separated shapes (circle / square / triangle) in a small vocabulary of
colors and two sizes, drawn on a plain light background. Some objects carry a part (a white
"dot" in their middle), which gives `fine` regions next to the `coarse` whole objects. Every
object has a unique (size, color, shape) triple, so a referring expression such as "the red
circle" or "the large blue square" always names exactly one object
(`referring_expression`). Everything is a pure function of (seed, index): `make_scene` is
the ground truth, `render` draws it (PNG bytes), and the oracle backends in
`data_engine/backends/oracle.py` answer from the same scene dict.
"""
from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (225, 195, 20),
    "pink": (240, 110, 170),
}
SIZES = {"small": (0.17, 0.21), "large": (0.27, 0.32)}  # side as a fraction of the image side
PART = "dot"
PART_COLOR = "white"
BACKGROUND = (242, 242, 242)


def make_scene(seed: int, index: int, image_size: int = 128, min_objects: int = 2,
               max_objects: int = 6, part_prob: float = 0.5) -> dict[str, Any]:
  """The ground truth of scene `index` of the dataset `seed` (a JSON-able dict).

  Returns {"seed", "index", "image_size", "objects": [{"id", "shape", "color", "size",
  "box": [x1, y1, x2, y2] (pixels), "part": None | {"name", "color", "box"}}]}.
  """
  rng = random.Random(f"synthetic-scenes/{seed}/{index}")
  s = image_size
  want = rng.randint(min_objects, max_objects)
  triples = [(z, c, sh) for z in SIZES for c in COLORS for sh in SHAPES]
  rng.shuffle(triples)
  objects: list[dict[str, Any]] = []
  gap = max(2, s // 32)
  for size, color, shape in triples:
    if len(objects) == want:
      break
    lo, hi = SIZES[size]
    side = int(round(rng.uniform(lo, hi) * s))
    for _ in range(30):  # rejection sampling of a well separated position
      x1, y1 = rng.randint(gap, s - side - gap), rng.randint(gap, s - side - gap)
      box = [x1, y1, x1 + side, y1 + side]
      if all(_separated(box, o["box"], gap) for o in objects):
        break
    else:
      continue
    part = None
    if rng.random() < part_prob:
      r = max(2, int(round(side * 0.16)))
      cx, cy = _centre(shape, box)
      part = {"name": PART, "color": PART_COLOR,
              "box": [cx - r, cy - r, cx + r, cy + r]}
    objects.append({"id": len(objects), "shape": shape, "color": color, "size": size,
                    "box": box, "part": part})
  return {"seed": seed, "index": index, "image_size": s, "objects": objects}


def _separated(a, b, gap) -> bool:
  return (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _centre(shape: str, box) -> tuple[int, int]:
  x1, y1, x2, y2 = box
  cx = (x1 + x2) // 2
  # the centroid of the upward triangle drawn by `render` sits 2/3 of the way down
  cy = (y1 + 2 * y2) // 3 if shape == "triangle" else (y1 + y2) // 2
  return cx, cy


def render(scene: dict[str, Any]) -> Image.Image:
  """Draw a scene (RGB PIL image, image_size x image_size)."""
  s = scene["image_size"]
  img = Image.new("RGB", (s, s), BACKGROUND)
  draw = ImageDraw.Draw(img)
  for o in scene["objects"]:
    x1, y1, x2, y2 = o["box"]
    fill = COLORS[o["color"]]
    # PIL's x2/y2 are inclusive: draw to x2-1 so the box is the exact pixel extent.
    if o["shape"] == "circle":
      draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif o["shape"] == "square":
      draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
    else:
      draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
    if o["part"] is not None:
      px1, py1, px2, py2 = o["part"]["box"]
      draw.ellipse([px1, py1, px2 - 1, py2 - 1], fill=(255, 255, 255))
  return img


def render_png(scene: dict[str, Any]) -> bytes:
  buf = io.BytesIO()
  render(scene).save(buf, format="PNG", optimize=False, compress_level=1)
  return buf.getvalue()


# ---------------------------------------------------------------- language of the scenes
def object_phrase(o: dict[str, Any], with_size: bool = True) -> str:
  return f"{o['size']} {o['color']} {o['shape']}" if with_size else f"{o['color']} {o['shape']}"


def referring_expression(scene: dict[str, Any], obj_id: int, part: bool = False) -> str:
  """The shortest unique description: "the circle" < "the red circle" < "the large circle" <
  "the large red circle"; parts are "the dot on <object>"."""
  objs = scene["objects"]
  o = objs[obj_id]
  for attrs in (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape")):
    matches = [p for p in objs if all(p[a] == o[a] for a in attrs)]
    if len(matches) == 1:
      base = "the " + " ".join(o[a] for a in attrs)
      break
  else:  # impossible: triples are unique
    raise AssertionError(f"scene {scene['index']}: object {obj_id} is not unique")
  return f"the {PART} on {base}" if part else base


def position_words(box, image_size: int) -> str:
  cx, cy = (box[0] + box[2]) / 2 / image_size, (box[1] + box[3]) / 2 / image_size
  v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
  h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
  return "center" if (v, h) == ("middle", "center") else f"{v} {h}"


def caption(scene: dict[str, Any]) -> str:
  """Image caption naming every object (and its part): spaCy finds the phrases in it."""
  parts = []
  for o in scene["objects"]:
    text = f"a {object_phrase(o)}"
    if o["part"] is not None:
      text += f" with a {PART_COLOR} {PART}"
    parts.append(text)
  listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
  return listing[0].upper() + listing[1:] + " on a plain background."


def describe(scene: dict[str, Any], obj_id: int, part: bool = False) -> str:
  """Detailed region description of an object (or its part)."""
  o = scene["objects"][obj_id]
  s = scene["image_size"]
  if part:
    return (f"a small {PART_COLOR} {PART} in the middle of the {object_phrase(o)}, "
            f"in the {position_words(o['part']['box'], s)} of the image")
  extra = f" with a {PART_COLOR} {PART} in its middle" if o["part"] is not None else ""
  return f"a {object_phrase(o)}{extra}, in the {position_words(o['box'], s)} of the image"


def answer(scene: dict[str, Any], question: str) -> str:
  """Oracle answers for the grounded-conversation variant."""
  q = question.lower()
  objs = scene["objects"]
  if "how many" in q:
    return f"There are {len(objs)} shapes: " + caption(scene)[:-len(" on a plain background.")].lower() + "."
  if "dot" in q:
    with_dot = [o for o in objs if o["part"] is not None]
    if not with_dot:
      return "None of the shapes has a dot."
    names = [f"the {object_phrase(o)}" for o in with_dot]
    return ("The " + PART + (" is on " if len(names) == 1 else "s are on ")
            + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]) + ".")
  return "The image shows " + caption(scene)[0].lower() + caption(scene)[1:]


def scene_arrays(scene: dict[str, Any], include_parts: bool = True):
  """Ground-truth boxes [N, 4] float32 xyxy pixels and labels (object/part names)."""
  boxes, labels = [], []
  for o in scene["objects"]:
    boxes.append(o["box"])
    labels.append(object_phrase(o))
    if include_parts and o["part"] is not None:
      boxes.append(o["part"]["box"])
      labels.append(PART)
  return np.asarray(boxes, np.float32).reshape(-1, 4), labels
