"""Processor benchmark: ours (numpy + PIL) vs the official pipeline (PIL + transformers + torch).

  python benchmarks/processor.py [--image PATH] [--repeats 7]

One image (default: the golden `processor_rexseek` "conversation" photograph, 1024 x 768) with
8 boxes -> pixel_values_aux [768,768,3], pixel_values [336,336,3], boxes in the 768 frame.
Ours: `ChatRexProcessor.preprocess_image`. Reference: RexSeek `expand2square` (PIL paste) +
transformers' PIL `CLIPImageProcessor` at 768 + `F.interpolate(bilinear, align_corners=False)`
+ the official box chain. Each side runs in its own fresh subprocess (after warm-up, median of
--repeats runs); peak memory is the kernel's peak RSS (`VmHWM`, reset before the run) minus the
RSS before it. max_abs_err compares the two outputs (NCHW). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from measure import reset_peak, status_mb


def _load(path):
  import numpy as np
  if path:
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))
  from chatrex_jax import testing
  with np.load(testing.require_golden_root() / "processor_rexseek" / "inputs.npz") as z:
    return z["conversation_image"]


def child(args):
  import numpy as np
  from PIL import Image
  img = _load(args.image)
  h, w = img.shape[:2]
  boxes = np.array([[0, 0, w, h], [10, 20, 300, 400], [w - 50, h - 40, w + 10, h + 5]] * 3)[:8]
  if args.side == "ours":
    from chatrex_jax.inference.processor import ChatRexProcessor
    proc = ChatRexProcessor()

    def run():
      r = proc.preprocess_image(img, boxes)
      return r.nchw()
  else:
    import torch
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    clip = CLIPImageProcessorPil(size={"shortest_edge": 768},
                                 crop_size={"height": 768, "width": 768})
    pil = Image.fromarray(img)

    def run():
      width, height = pil.size
      if width == height:
        sq = pil
      elif width > height:
        sq = Image.new(pil.mode, (width, width), (122, 116, 104))
        sq.paste(pil, (0, (width - height) // 2))
      else:
        sq = Image.new(pil.mode, (height, height), (122, 116, 104))
        sq.paste(pil, ((height - width) // 2, 0))
      aux = clip.preprocess(sq, return_tensors="pt")["pixel_values"]
      small = torch.nn.functional.interpolate(aux, size=[336, 336], mode="bilinear",
                                              align_corners=False)
      b = np.array(boxes, np.float64)
      b = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], -1).astype(np.float32)
      if width > height:
        b[:, 1] += (width - height) // 2
      else:
        b[:, 0] += (height - width) // 2
      b *= 768 / max(width, height)
      gt = np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], -1)
      return {"pixel_values": small.numpy(), "pixel_values_aux": aux.numpy(), "gt_boxes": gt[None]}
  out = run()  # warm-up
  base = status_mb("VmRSS")
  reset_peak()
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    out = run()
    times.append(time.perf_counter() - t0)
  peak = status_mb("VmHWM") - base
  np.savez(args.out, **out)
  print(json.dumps({"s": statistics.median(times), "peak_mb": peak}))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--image", default=None)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--side", choices=["ours", "ref"], default=None, help=argparse.SUPPRESS)
  p.add_argument("--out", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.side:
    return child(args)
  import numpy as np
  res = {}
  with tempfile.TemporaryDirectory() as tmp:
    for side in ("ours", "ref"):
      out = os.path.join(tmp, f"{side}.npz")
      cmd = [sys.executable, __file__, "--side", side, "--out", out, "--repeats", str(args.repeats)]
      if args.image:
        cmd += ["--image", args.image]
      line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
      res[side] = json.loads(line.splitlines()[-1])
      with np.load(out) as z:
        res[side]["arrays"] = {k: z[k] for k in z.files}
  err = max(float(np.abs(res["ours"]["arrays"][k] - res["ref"]["arrays"][k]).max())
            for k in res["ours"]["arrays"])
  print(json.dumps({"name": "processor", "config": "1024x768 photo, 8 boxes -> 768 aux + 336 clip",
                    "ours_s": res["ours"]["s"], "ref_s": res["ref"]["s"],
                    "speedup": res["ref"]["s"] / res["ours"]["s"],
                    "ours_peak_mb": res["ours"]["peak_mb"], "ref_peak_mb": res["ref"]["peak_mb"],
                    "max_abs_err": err}))


if __name__ == "__main__":
  main()
