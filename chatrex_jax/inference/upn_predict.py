"""`predict-upn`: UPN proposals for one image, printed as JSON and drawn into a PNG.

  python -m chatrex_jax.inference.upn_predict --upn upn_large.pth --image photo.jpg \\
      --prompt-type fine --min-score 0.3 --nms 0.8 --out proposals.png

`--config` picks the model (`large` = chatrex_jax/configs/upn_large.py, the released checkpoint; `tiny`;
or a path `FILE[:ARG]` to an ml_collections config with a `model` section).
"""
from __future__ import annotations

import argparse
import json
import sys

from chatrex_jax.errors import atomic_path


def load_config(spec: str):
  """'large' | 'tiny' (the packaged upn_large / upn_tiny) | NAME[:ARG] | FILE[:ARG] -> UPNConfig."""
  from chatrex_jax import configs
  from chatrex_jax.models.upn.upn import UPNConfig
  name, sep, arg = spec.partition(":")
  if name in ("large", "tiny"):
    spec = f"upn_{name}{sep}{arg}"
  return UPNConfig.from_config_dict(configs.load_config(spec).model)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="predict-upn", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--upn", required=True, help="UPN checkpoint (.pth with ckpt['model'], or .safetensors)")
  ap.add_argument("--image", required=True, help="input image")
  ap.add_argument("--prompt-type", default="fine", choices=["fine", "coarse"])
  ap.add_argument("--min-score", type=float, default=0.3)
  ap.add_argument("--nms", type=float, default=0.8, help="NMS IoU threshold; <= 0 disables NMS")
  ap.add_argument("--out", default=None, help="PNG with the proposals drawn")
  ap.add_argument("--config", default="large", help="large | tiny | FILE[:ARG]")
  ap.add_argument("--short-side", type=int, default=800, help="resize short side (official: 800)")
  ap.add_argument("--max-size", type=int, default=1333, help="resize long-side cap (official: 1333)")
  args = ap.parse_args(argv)

  from chatrex_jax.inference.upn import UPNPredictor, load_image
  from chatrex_jax.inference.visualize import draw_boxes
  config = load_config(args.config)
  image = load_image(args.image)            # a bad image fails before the checkpoint loads
  upn = UPNPredictor.from_checkpoint(args.upn, config, size=args.short_side, max_size=args.max_size)
  result = upn([image], args.prompt_type)
  kept = upn.filter(result, args.min_score, args.nms if args.nms > 0 else None)[0]
  print(json.dumps({"image": str(args.image), "prompt_type": args.prompt_type,
                    "boxes": kept.boxes.tolist(), "scores": [float(s) for s in kept.scores]}))
  if args.out:
    with atomic_path(args.out) as tmp:
      draw_boxes(image, kept.boxes, scores=kept.scores).save(tmp, format="PNG")
    print(f"wrote {args.out} ({len(kept.boxes)} boxes)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
