"""UPN training input pipeline on Grain (issue 9): engine records + COCO JSON, tagged by granularity.

    cfg = default_upn_data_config()                  # the `data` section of chatrex_jax/configs/upn_train_*.py
    cfg.sources = [{"path": "/data/sa1b_engine", "format": "engine", "granularity": "both"},
                   {"path": "/data/coco/instances_train2017.json", "format": "coco",
                    "images_dir": "/data/coco/train2017", "granularity": "coarse", "weight": 2.0}]
    it = make_upn_iterator(cfg)                      # this process's shard, fixed-shape batches
    batch = next(it); state = it.get_state(); ...; it.set_state(state)   # exact resume

Examples and prompts
--------------------
UPN trains one binary detection problem per prompt: every example carries a `prompt_id`
(`PROMPT_IDS`: 0 = fine-grained prompt, 1 = coarse-grained prompt) and the target boxes of that
granularity only. A source's `granularity` decides the prompt:

* "fine" / "coarse": every record (image) gives one example with that prompt. For an engine
  source only the regions tagged with that granularity are targets; for a COCO source every
  non-crowd annotation is (COCO-format data carries no per-box tag: the tag is the source's).
* "both" (engine sources only, the default there): record i gives TWO examples, element 2i with
  the coarse prompt (the `coarse` regions as targets) and 2i+1 with the fine prompt (the `fine`
  regions). An image with no region of a granularity still gives that example, with no
  targets: it teaches the prompt that nothing of its granularity is there (exact for the
  synthetic scenes; for engine data whose fine annotation is incomplete prefer "coarse").

Augmentation (the official DETR/DINO recipe, in a fixed-shape form)
--------------------------------------------------------------------
Per example, with Grain's per-element seeded rng (element i is a pure function of (seed, i)):
1. horizontal flip with p = 0.5;
2. with p = `crop_prob` (0.5 officially): DETR's RandomSizeCrop - a crop of random width and
   height in [crop_min_frac, 1] of the image side (DETR: RandomResize([400, 500, 600]) then
   RandomSizeCrop(384, 600), i.e. ~0.64-1.0 of the side), boxes clipped to the crop and dropped
   when empty;
3. random resize: the short side to a random element of `scales`, the long side capped at
   `max_size` (DETR's RandomResize(scales, max_size=1333));
4. ImageNet normalisation, pasted top-left into a fixed `max_size` x `max_size` canvas; `mask`
   is True on the padding (the model's valid ratios come from it).
Boxes are normalised cxcywh relative to the VALID (resized) region, as DETR's Normalize does.
At most `max_targets` boxes are kept (the first ones in record order after the augmentation).

A batch (per process, Bl = batch_size // process_count, S = max_size, T = max_targets):

  images      float32 [Bl, S, S, 3]  NHWC, ImageNet-normalised, zero on padding
  mask        bool    [Bl, S, S]     True on padding
  boxes       float32 [Bl, T, 4]     normalised cxcywh, zero padded
  box_mask    bool    [Bl, T]
  prompt_id   int32   [Bl]           0 fine, 1 coarse
  size_hw     int32   [Bl, 2]        the valid (resized) image size in the canvas
  num_boxes, source_id, record_index, epoch   int32 [Bl]   (bookkeeping)

The source order, weighted mixing, per-process sharding and the checkpointable iterator are the
MLLM pipeline's (`chatrex_jax.data.pipeline.reference_dataset` / `DataIterator`).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np
from PIL import Image

from chatrex_jax.data import pipeline as mllm_pipeline
from chatrex_jax.errors import UserError
from chatrex_jax.ops import boxes as box_ops

PROMPT_IDS = {"fine": 0, "coarse": 1}
PROMPT_NAMES = {v: k for k, v in PROMPT_IDS.items()}
MEAN = np.asarray((0.485, 0.456, 0.406), np.float32)
STD = np.asarray((0.229, 0.224, 0.225), np.float32)
GRANULARITY_MODES = ("fine", "coarse", "both")


def default_upn_data_config() -> ml_collections.ConfigDict:
  """The `data` section of a UPN training config (official values where they exist)."""
  c = ml_collections.ConfigDict()
  # [{"path", "format": "engine"|"coco", "granularity": "fine"|"coarse"|"both", "weight",
  #   "images_dir" (coco), "split" (engine), "name"}]
  c.sources = []
  c.split = "train"
  c.batch_size = 16
  c.max_size = 1333                   # canvas side = the official max long side
  c.scales = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]  # DETR short sides
  c.crop_prob = 0.5
  c.crop_min_frac = 0.64              # ~ DETR RandomSizeCrop(384, 600) after a 600 short side
  c.flip_prob = 0.5
  c.max_targets = 100
  c.seed = 0
  c.num_epochs = ml_collections.config_dict.placeholder(int)   # None = repeat forever
  c.num_threads = 4
  c.prefetch_buffer_size = 8
  c.num_workers = 0
  return c


class DataError(UserError, ValueError):
  """A record or annotation the UPN pipeline cannot use (names source, index and field)."""


# ------------------------------------------------------------------------------------------
# Sources: random access to (PIL image, [N, 4] xyxy pixel boxes, prompt id)


@dataclasses.dataclass
class Item:
  image: Image.Image
  boxes: np.ndarray     # [N, 4] float32 xyxy pixels of `image`
  prompt_id: int
  key: str


def _decode_image(data: bytes, where: str) -> Image.Image:
  if not isinstance(data, (bytes, bytearray)) or not data:
    raise DataError(f"{where}: field image: expected non-empty encoded image bytes")
  try:
    with Image.open(io.BytesIO(data)) as f:
      f.load()
      img = f.copy()
  except Exception as e:
    raise DataError(f"{where}: field image: not a decodable image ({e})") from e
  return img if img.mode == "RGB" else img.convert("RGB")


class EngineUPNSource:
  """Engine records (or any sequence of record dicts) as UPN items.

  granularity "fine"/"coarse": len = records, that granularity's regions; "both": len =
  2 x records, element 2i coarse, 2i+1 fine (see the module docstring).
  """

  def __init__(self, records: Sequence[Mapping[str, Any]], granularity: str = "both",
               name: str = "engine"):
    if granularity not in GRANULARITY_MODES:
      raise ValueError(f"source {name!r}: granularity must be one of {GRANULARITY_MODES}, "
                       f"got {granularity!r}")
    self.records, self.granularity, self.name = records, granularity, name

  def __len__(self) -> int:
    return len(self.records) * (2 if self.granularity == "both" else 1)

  def __getitem__(self, index: int) -> Item:
    if self.granularity == "both":
      rec_index, gran = index // 2, ("coarse", "fine")[index % 2]
    else:
      rec_index, gran = index, self.granularity
    rec = self.records[rec_index]
    where = f"source {self.name!r} record {rec_index} ({rec.get('key', '?')})"
    img = _decode_image(rec.get("image"), where)
    regions = rec.get("regions") or []
    try:
      boxes = [r["box"] for r in regions if r["granularity"] == gran]
    except (KeyError, TypeError) as e:
      raise DataError(f"{where}: field regions: {e}") from e
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return Item(img, boxes, PROMPT_IDS[gran], str(rec.get("key", rec_index)))


class CocoUPNSource:
  """COCO-format detection JSON (`images` + `annotations`, bbox [x, y, w, h] pixels) as UPN
  items; every non-crowd box is a target of the source's prompt ("fine" or "coarse")."""

  def __init__(self, annotation_file: str, images_dir: str, granularity: str,
               name: str | None = None):
    if granularity not in ("fine", "coarse"):
      raise ValueError(f"COCO source {annotation_file}: granularity must be 'fine' or 'coarse' "
                       f"(COCO boxes carry no per-box tag), got {granularity!r}")
    self.name = name or os.path.basename(annotation_file)
    with open(annotation_file) as f:
      data = json.load(f)
    for k in ("images", "annotations"):
      if k not in data:
        raise DataError(f"{annotation_file}: not COCO format (no {k!r})")
    self.images = sorted(data["images"], key=lambda im: im["id"])
    per: dict[Any, list] = {im["id"]: [] for im in self.images}
    for a in data["annotations"]:
      if a.get("iscrowd", 0):
        continue
      if a["image_id"] not in per:
        raise DataError(f"{annotation_file}: annotation {a.get('id')} names unknown image "
                        f"{a['image_id']}")
      x, y, w, h = a["bbox"]
      if w > 0 and h > 0:
        per[a["image_id"]].append([x, y, x + w, y + h])
    self.boxes = {k: np.asarray(v, np.float32).reshape(-1, 4) for k, v in per.items()}
    self.images_dir, self.prompt_id = images_dir, PROMPT_IDS[granularity]

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> Item:
    im = self.images[index]
    path = os.path.join(self.images_dir, im["file_name"])
    where = f"source {self.name!r} image {im['id']} ({path})"
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise DataError(f"{where}: cannot read the image: {e}") from e
    return Item(_decode_image(data, where), self.boxes[im["id"]], self.prompt_id, str(im["id"]))


def open_upn_sources(cfg) -> list[tuple[str, Sequence[Item], float]]:
  """[(name, source, weight)] for `cfg.sources`."""
  out = []
  for i, s in enumerate(cfg.sources):
    s = dict(s)
    fmt = s.get("format", "engine")
    if not s.get("path"):
      raise ValueError(f"data.sources[{i}]: no path")
    if fmt == "engine":
      recs = mllm_pipeline.RecordSource(s["path"], s.get("split", cfg.split), s.get("name"))
      src = EngineUPNSource(recs, s.get("granularity", "both"), recs.name)
    elif fmt == "coco":
      if "granularity" not in s:
        raise ValueError(f"data.sources[{i}] (coco): needs a granularity tag 'fine' or 'coarse'")
      src = CocoUPNSource(s["path"], s.get("images_dir", os.path.dirname(s["path"])),
                          s["granularity"], s.get("name"))
    else:
      raise ValueError(f"data.sources[{i}]: format must be 'engine' or 'coco', got {fmt!r}")
    out.append((src.name, src, float(s.get("weight", 1.0))))
  return out


# ------------------------------------------------------------------------------------------
# Augmentation


def hflip(img: Image.Image, boxes: np.ndarray) -> tuple[Image.Image, np.ndarray]:
  """Mirror the image; xyxy pixel boxes follow (x -> W - x)."""
  w = img.width
  b = boxes.copy()
  b[:, 0], b[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
  return img.transpose(Image.FLIP_LEFT_RIGHT), b


def crop(img: Image.Image, boxes: np.ndarray, region: tuple[int, int, int, int]):
  """DETR's crop: region (x, y, w, h); boxes shifted, clipped to it, empty ones dropped."""
  x, y, w, h = region
  out = img.crop((x, y, x + w, y + h))
  b = boxes - np.asarray([x, y, x, y], np.float32)
  b = np.minimum(np.maximum(b, 0), np.asarray([w, h, w, h], np.float32))
  keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
  return out, b[keep]


def resized_size(w: int, h: int, short: int, max_size: int) -> tuple[int, int]:
  """(new_w, new_h): the short side to `short`, the long side capped at `max_size`."""
  scale = min(short / min(w, h), max_size / max(w, h))
  return (int(min(max_size, max(1, round(w * scale)))), int(min(max_size, max(1, round(h * scale)))))


def augment(img: Image.Image, boxes: np.ndarray, rng: np.random.Generator, cfg,
            train: bool = True) -> tuple[Image.Image, np.ndarray]:
  """flip / crop / resize of one image and its [N, 4] xyxy pixel boxes (module docstring).

  train=False: no flip or crop, resize to the largest scale."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  if train and rng.random() < cfg.flip_prob:
    img, boxes = hflip(img, boxes)
  if train and rng.random() < cfg.crop_prob:
    w, h = img.size
    cw = int(rng.integers(max(1, int(np.ceil(cfg.crop_min_frac * w))), w + 1))
    ch = int(rng.integers(max(1, int(np.ceil(cfg.crop_min_frac * h))), h + 1))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img, boxes = crop(img, boxes, (x, y, cw, ch))
  scales = list(cfg.scales)
  short = int(scales[int(rng.integers(len(scales)))]) if train else int(max(scales))
  nw, nh = resized_size(img.width, img.height, short, cfg.max_size)
  sx, sy = nw / img.width, nh / img.height
  if (nw, nh) != img.size:
    img = img.resize((nw, nh), Image.BILINEAR)
  boxes = boxes * np.asarray([sx, sy, sx, sy], np.float32)
  return img, boxes


def to_canvas(img: Image.Image, boxes: np.ndarray, canvas: int, max_targets: int) -> dict[str, np.ndarray]:
  """Normalised image in a fixed canvas + padding mask + normalised cxcywh targets."""
  w, h = img.size
  if w > canvas or h > canvas:
    raise ValueError(f"image {w}x{h} does not fit the {canvas} canvas")
  x = np.asarray(img, np.uint8).astype(np.float32) / np.float32(255)
  image = np.zeros((canvas, canvas, 3), np.float32)
  image[:h, :w] = (x - MEAN) / STD
  mask = np.ones((canvas, canvas), bool)
  mask[:h, :w] = False
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)[:max_targets]
  n = boxes.shape[0]
  cxcywh = box_ops.xyxy_to_cxcywh(boxes) / np.asarray([w, h, w, h], np.float32)
  out_boxes = np.zeros((max_targets, 4), np.float32)
  out_boxes[:n] = cxcywh
  box_mask = np.zeros((max_targets,), bool)
  box_mask[:n] = True
  return dict(images=image, mask=mask, boxes=out_boxes, box_mask=box_mask,
              size_hw=np.asarray([h, w], np.int32), num_boxes=np.int32(n))


class UPNExampleBuilder:
  """(reference, rng) -> one fixed-shape example (numpy dict; module docstring). Picklable."""

  def __init__(self, cfg, sources: Sequence[tuple[str, Sequence[Item], float]], train: bool = True):
    self.cfg = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    self.sources = [(name, src) for name, src, _ in sources]
    self.train = train

  def __call__(self, ref, rng: np.random.Generator) -> dict[str, np.ndarray]:
    name, src = self.sources[ref.source_id]
    try:
      item = src[ref.index]
    except DataError:
      raise
    except Exception as e:
      raise DataError(f"source {name!r} (#{ref.source_id}) index {ref.index}: {e}") from e
    out = self.build(item, rng)
    out.update(source_id=np.int32(ref.source_id), record_index=np.int32(ref.index),
               epoch=np.int32(ref.epoch))
    return out

  def build(self, item: Item, rng: np.random.Generator) -> dict[str, np.ndarray]:
    img, boxes = augment(item.image, item.boxes, rng, self.cfg, self.train)
    out = to_canvas(img, boxes, self.cfg.max_size, self.cfg.max_targets)
    out["prompt_id"] = np.int32(item.prompt_id)
    return out


def _check(cfg):
  errs = []
  if cfg.batch_size < 1:
    errs.append(f"batch_size={cfg.batch_size} < 1")
  if not cfg.scales or max(cfg.scales) < 1:
    errs.append(f"scales={list(cfg.scales)} must be positive short sides")
  if cfg.max_size < 32:
    errs.append(f"max_size={cfg.max_size} < 32")
  if cfg.max_targets < 1:
    errs.append(f"max_targets={cfg.max_targets} < 1")
  if not 0 < cfg.crop_min_frac <= 1:
    errs.append(f"crop_min_frac={cfg.crop_min_frac} outside (0, 1]")
  if errs:
    raise ValueError("invalid UPN data config: " + "; ".join(errs))


def build_upn_dataset(cfg, *, sources=None, process_index: int | None = None,
                      process_count: int | None = None, batched: bool = True, train: bool = True):
  """This process's grain.MapDataset of batches (or examples with batched=False).

  sources: optional [(name, random-access source of `Item`s, weight)] instead of cfg.sources.
  """
  _check(cfg)
  pi, pc = mllm_pipeline._process_info(process_index, process_count)
  sources = open_upn_sources(cfg) if sources is None else list(sources)
  refs = mllm_pipeline.reference_dataset(cfg, [len(s) for _, s, _ in sources],
                                         [w for _, _, w in sources])
  builder = UPNExampleBuilder(cfg, sources, train=train)
  examples = refs.random_map(builder, seed=mllm_pipeline._seeds(cfg.seed, len(sources) + 1)[-1])
  return mllm_pipeline.process_share(examples, cfg.batch_size, pi, pc, batched)


def make_upn_iterator(cfg, *, sources=None, process_index: int | None = None,
                      process_count: int | None = None) -> mllm_pipeline.DataIterator:
  """Checkpointable batch iterator (`get_state()` / `set_state()`, JSON-able state)."""
  pi, pc = mllm_pipeline._process_info(process_index, process_count)
  srcs = open_upn_sources(cfg) if sources is None else list(sources)
  ds = build_upn_dataset(cfg, sources=srcs, process_index=pi, process_count=pc)
  fp = mllm_pipeline.fingerprint(cfg, [len(s) for _, s, _ in srcs], pi, pc)
  return mllm_pipeline.to_iterator(ds, cfg, fp)
