"""`chatrex-jax data-engine` / `python -m data_engine`.

    chatrex-jax data-engine --config data_engine_synthetic:200 --output /tmp/scenes
    chatrex-jax data-engine --config data_engine_hf:/models --output /data/rv \\
        --config.batch_size=16 --runner DataflowRunner -- --project=... --region=...

Rerunning the same command resumes: finished shards are kept, the rest are redone.
Arguments after `--` are passed to Beam as pipeline options.
"""
from __future__ import annotations

import argparse
import json
import sys

from chatrex_jax.configs import load_config, split_overrides
from chatrex_jax.errors import command


@command("data-engine")
def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  beam_args: list[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, beam_args = argv[:i], argv[i + 1:]
  rest, overrides = split_overrides(argv)
  parser = argparse.ArgumentParser(prog="chatrex-jax data-engine", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True,
                      help="NAME[:ARG] (a packaged config, e.g. data_engine_synthetic:64) or FILE[:ARG]")
  parser.add_argument("--output", required=True, help="output directory (resumable)")
  parser.add_argument("--runner", default=None, help="Beam runner (default: DirectRunner)")
  parser.add_argument("--overwrite", action="store_true",
                      help="discard an earlier run in --output made with another config/inputs")
  parser.add_argument("--print-config", action="store_true")
  args = parser.parse_args(rest)

  from data_engine import config as config_lib
  from data_engine import pipeline
  config = load_config(args.config, overrides)
  cfg = config_lib.to_plain(config)
  if args.runner:
    cfg["beam"]["runner"] = args.runner
  if beam_args:
    cfg["beam"]["pipeline_args"] = list(cfg["beam"].get("pipeline_args", [])) + beam_args
  if args.print_config:
    print(json.dumps(cfg, indent=1, sort_keys=True))
  pipeline.run(cfg, args.output, overwrite=args.overwrite)
  return 0


if __name__ == "__main__":
  sys.exit(main())
