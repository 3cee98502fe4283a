"""Object encoder at the real size: fused JAX path vs the official upsample + concat + roi_align.

  python benchmarks/object_encoder.py                 # 1 image, 100 boxes, 768-px frame
  python benchmarks/object_encoder.py --devices 8     # batch of 8 sharded over 8 fake devices

Maps (ConvNeXt-L at 768): 192x192x192, 96x96x384, 48x48x768, 24x24x1536, fp32; 100 boxes
(random sizes 16-512 px, some extending past the image). Ours: `MultiLevelRoIEncoder` under
`jit` on NHWC maps (the ConvNeXt tower's layout). Reference: RexSeek's composition in torch
(`F.interpolate` x3 + `torch.cat` + `torchvision.ops.roi_align` + mean + sine embedding) on
NCHW maps, under `torch.no_grad()`, one image at a time as the official code does.

Time: after warm-up, median of --repeats runs, both in this process (same threads).

Peak memory (memory used on top of the inputs, which both sides hold):
* ours_peak_mb: XLA's buffer plan of the compiled executable, `memory_analysis()`
  temp + output bytes (summed over devices when sharded). This is exactly what the executable
  allocates besides its arguments.
* ref_peak_mb: a fresh subprocess builds the inputs, warms torch up on a tiny input, reads its
  peak RSS (VmHWM, i.e. ru_maxrss of this address space), runs the reference once and reads it
  again; the delta is the reference's peak.
  (`ref_expected_mb` in config is the analytic size of the tensors it allocates.)
* ours_rss_* (config, cross-checks of ours with the peak-RSS method in a fresh subprocess):
  compile = the peak-RSS growth of XLA's one-off compilation (paid once per shape, not per
  call); run_only = the peak of the first run of the compiled executable after resetting the
  high-water mark to the current RSS (/proc/self/clear_refs "5", Linux >= 4.0; None elsewhere).
max_abs_err: max |ours - reference| over all boxes and channels (and / max|reference| in config).
The last line is one JSON object (docs/architecture.md "Benchmarks output format").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from measure import median_time, peak_rss_mb, reset_peak

SHAPES = [(192, 192, 192), (96, 96, 384), (48, 48, 768), (24, 24, 1536)]   # (H, W, C)
IMAGE = 768
SCALE = 192 / 768


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--boxes", type=int, default=100)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--devices", type=int, default=1,
                 help="> 1: fake CPU devices (XLA_FLAGS) and a batch of that many images "
                      "sharded over them")
  p.add_argument("--ref-repeats", type=int, default=3,
                 help="timed runs of the (slow) reference; its median is reported")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--memory-child", choices=["ours", "ref"], help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _setup_env(devices: int):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if devices > 1:
    flag = f"--xla_force_host_platform_device_count={devices}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def make_inputs(batch: int, n_boxes: int, seed: int):
  """NCHW maps [batch, C, H, W] per level, boxes [batch, O, 4] xyxy in the 768 frame (numpy)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  maps = [rng.standard_normal((batch, c, h, w), dtype=np.float32) for h, w, c in SHAPES]
  wh = rng.uniform(16, 512, size=(batch, n_boxes, 2))
  xy = rng.uniform(-0.1, 0.95, size=(batch, n_boxes, 2)) * IMAGE - wh / 4
  boxes = np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)
  return maps, boxes


def _ours(devices: int, batch: int, n_boxes: int):
  """(jitted fn, device-put args builder) for the fused encoder."""
  import jax
  import numpy as np

  from chatrex_jax.models.object_encoder import MultiLevelRoIEncoder
  enc = MultiLevelRoIEncoder(output_size=7, spatial_scale=SCALE)
  fn = jax.jit(lambda feats, boxes, mask: enc.apply({}, feats, boxes, mask))

  def put(maps_nchw, boxes):
    feats = [np.ascontiguousarray(m.transpose(0, 2, 3, 1)) for m in maps_nchw]
    mask = np.ones(boxes.shape[:2], bool)
    if devices > 1:
      mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("data",))
      shard = lambda x: jax.device_put(x, jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec("data", *([None] * (x.ndim - 1)))))
    else:
      shard = jax.device_put
    return [shard(f) for f in feats], shard(boxes), shard(mask)
  return fn, put


def _ref_run(maps_t, boxes_t):
  """The official composition for a batch, one image at a time -> [B, O, 2880] torch."""
  import torch

  from chatrex_jax.tools.equivalence.object_encoder import torch_multi_level_roi
  with torch.no_grad():
    return torch.cat([torch_multi_level_roi([m[b:b + 1] for m in maps_t], boxes_t[b], 7, SCALE)
                      for b in range(boxes_t.shape[0])])


def memory_child(which: str, devices: int, n_boxes: int, seed: int) -> None:
  """Runs one side once in this (fresh) process; prints its peak-RSS delta(s) in MB."""
  import jax
  import numpy as np
  maps, boxes = make_inputs(devices, n_boxes, seed)
  if which == "ref":
    import torch
    maps_t = [torch.from_numpy(m) for m in maps]
    boxes_t = torch.from_numpy(boxes)
    small = [torch.zeros(1, c, max(h // 8, 1), max(w // 8, 1)) for h, w, c in SHAPES]
    _ref_run(small, boxes_t[:1, :2] / 8)                       # warm torch/torchvision up
    base = peak_rss_mb()
    _ref_run(maps_t, boxes_t)
    print(json.dumps({"peak_delta_mb": peak_rss_mb() - base}))
    return
  fn, put = _ours(devices, devices, n_boxes)
  args = jax.block_until_ready(put(maps, boxes))   # inputs resident before the baseline
  base = peak_rss_mb()
  compiled = fn.lower(*args).compile()
  after_compile = peak_rss_mb() - base
  # Reset the high-water mark to the current RSS (Linux >= 4.0: clear_refs "5"), then run the
  # already compiled executable once: the run's own peak on top of inputs + compiled code.
  run_only = None
  if reset_peak():
    base2 = peak_rss_mb()
    np.asarray(compiled(*args))
    run_only = peak_rss_mb() - base2
  else:
    np.asarray(compiled(*args))
  print(json.dumps({"compile_mb": after_compile, "run_only_mb": run_only}))


def _child_peak(which: str, args) -> dict:
  out = subprocess.run([sys.executable, __file__, "--memory-child", which, "--devices",
                        str(args.devices), "--boxes", str(args.boxes), "--seed", str(args.seed)],
                       capture_output=True, text=True, check=True, env=dict(os.environ))
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  args = _parse(argv)
  _setup_env(args.devices)
  if args.memory_child:
    memory_child(args.memory_child, args.devices, args.boxes, args.seed)
    return
  import jax
  import numpy as np
  import torch
  batch = args.devices
  maps, boxes = make_inputs(batch, args.boxes, args.seed)

  fn, put = _ours(args.devices, batch, args.boxes)
  dev_args = jax.block_until_ready(put(maps, boxes))
  compiled = fn.lower(*dev_args).compile()
  mem = compiled.memory_analysis()
  per_device = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20
  ours_peak = per_device * (args.devices if args.devices > 1 else 1)
  ours_out = np.asarray(fn(*dev_args))                             # warm-up
  ours_s = median_time(lambda: fn(*dev_args).block_until_ready(), args.repeats)

  maps_t = [torch.from_numpy(m) for m in maps]
  boxes_t = torch.from_numpy(boxes)
  _ref_run([m[:1] for m in maps_t], boxes_t[:1])                   # warm-up (one image)
  ref_outs = []
  ref_s = median_time(lambda: ref_outs.append(_ref_run(maps_t, boxes_t)), args.ref_repeats)
  ref_out = ref_outs[-1].numpy()

  err = float(np.abs(ours_out - ref_out).max())
  scale = float(np.abs(ref_out).max())
  ref_peak = _child_peak("ref", args)["peak_delta_mb"]
  ours_rss = _child_peak("ours", args)
  concat_mb = 192 * 192 * sum(c for _, _, c in SHAPES) * 4 / 2**20
  upsampled_mb = sum(192 * 192 * c * 4 for _, _, c in SHAPES[1:]) / 2**20
  result = {
      "name": "object_encoder",
      "config": {
          "maps": [list(s) for s in SHAPES], "boxes_per_image": args.boxes, "batch": batch,
          "devices": args.devices, "image": IMAGE, "spatial_scale": SCALE,
          "threads_torch": torch.get_num_threads(), "backend": jax.default_backend(),
          "ref_repeats": args.ref_repeats, "repeats": args.repeats,
          "ours_mem_method": "XLA memory_analysis temp+output (x devices)",
          "ours_peak_mb_per_device": round(per_device, 2),
          "ref_note": "the reference runs the images one after another, so its peak is one "
                      "image's; ours with --devices N holds N images' temporaries at once",
          "ref_mem_method": "fresh subprocess peak-RSS (VmHWM) delta around one run",
          "ours_rss_compile_mb": round(ours_rss["compile_mb"], 1),
          "ours_rss_run_only_mb": (None if ours_rss["run_only_mb"] is None
                                   else round(ours_rss["run_only_mb"], 1)),
          "ref_expected_mb": round(upsampled_mb + concat_mb, 1),
          "max_rel_err_of_scale": err / scale,
      },
      "ours_s": ours_s,
      "ref_s": ref_s,
      "speedup": ref_s / ours_s,
      "ours_peak_mb": round(ours_peak, 2),
      "ref_peak_mb": round(ref_peak, 1),
      "memory_ratio": ref_peak / ours_peak,
      "max_abs_err": err,
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
