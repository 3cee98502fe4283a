"""Golden runner for `processor_rexseek` (RexSeek `prepare_input_for_rexseek`, no model).

For every case of meta.json: the stored uint8 image is fed as the official run fed it (a PIL
image, or a lossless PNG path for feed "path"), with its boxes, through
`chatrex_jax.inference.processor.ChatRexProcessor` (Qwen chat template, no tokenizer: the
fixture has no token ids). Outputs are compared in the official NCHW layout; the prompt string
is compared byte for byte, and its split on `<image>` / `<objfeat>` against meta.json's
`prompt_chunks_split_special_strings` (a mismatch fails the fixture).
"""
from __future__ import annotations

import pathlib
import tempfile

import numpy as np
from PIL import Image

from chatrex_jax.inference import processor as P
from chatrex_jax.ops import boxes as box_ops
from chatrex_jax.protocol import image as image_protocol
from chatrex_jax.protocol import templates, tokenize
from chatrex_jax.tools.equivalence.registry import Fixture, RunResult, register


def _pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def run_case(fixture: Fixture, case: dict, proc: P.ChatRexProcessor, tmp: pathlib.Path
             ) -> dict[str, np.ndarray]:
  """The fixture's outputs for one case (names prefixed with the case name)."""
  name = case["name"]
  image = fixture.inputs[f"{name}_image"]
  boxes = fixture.inputs[f"{name}_boxes_xyxy"]
  if case.get("feed", "pil") == "path":
    path = tmp / f"{name}.png"
    _pil(image).save(path)
    feed = str(path)
  else:
    feed = _pil(image)
  sample = proc.process(feed, case["question"], boxes)
  img = sample.image
  prompt_want = fixture.meta["prompts"][name]
  if sample.prompt != prompt_want:
    raise AssertionError(f"{name}: prompt differs:\n{sample.prompt!r}\nvs\n{prompt_want!r}")
  chunks = fixture.meta.get("prompt_chunks_split_special_strings", {}).get(name)
  if chunks is not None and tokenize.split_special_strings(sample.prompt) != chunks:
    raise AssertionError(f"{name}: prompt split on placeholders differs from the official split")
  w, h = img.size_wh
  xywh = box_ops.xyxy_to_xywh(np.reshape(boxes, (-1, 4)), dtype=np.float64)
  padded = image_protocol.pad_boxes(xywh, (w, h))
  nchw = img.nchw()
  return {
      f"{name}_pixel_values_aux": nchw["pixel_values_aux"],
      f"{name}_pixel_values": nchw["pixel_values"],
      f"{name}_gt_boxes": nchw["gt_boxes"],
      f"{name}_prompt_utf8": np.frombuffer(sample.prompt.encode("utf-8"), np.uint8).astype(np.int64),
      f"{name}_debug_square_side": np.array([img.square_side], np.int64),
      f"{name}_debug_boxes_xywh_after_pad": padded,
      f"{name}_debug_boxes_xywh_after_resize": image_protocol.resize_boxes(padded, img.square_side),
  }


@register("processor_rexseek")
def run_processor_rexseek(fixture: Fixture) -> RunResult:
  proc = P.ChatRexProcessor(template=templates.QWEN_CHAT)
  outputs: dict[str, np.ndarray] = {}
  notes = []
  with tempfile.TemporaryDirectory() as tmp:
    for case in fixture.config["cases"]:
      outputs.update(run_case(fixture, case, proc, pathlib.Path(tmp)))
  if "observed_errors" in fixture.meta:
    notes.append("official expand2square raises on a non-square PIL mode-L image; this "
                 "processor converts it to RGB (= the official path branch), by design")
  exact = frozenset(k for k in outputs if k.endswith("_pixel_values_aux") or
                    k.endswith("_gt_boxes") or "_debug_" in k)
  return RunResult(outputs=outputs, exact=exact, notes=notes)
