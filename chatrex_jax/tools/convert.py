"""`chatrex-jax convert`: official checkpoints <-> this project's formats, both directions.

  chatrex-jax convert llm --from HF_DIR --to FLAX_DIR         # and FLAX_DIR -> HF_DIR
  chatrex-jax convert llm --from MODEL.gguf --to HF_DIR       # llama.cpp GGUF -> HF (+ tokenizer)
  chatrex-jax convert chatrex --from OFFICIAL_DIR --to OUT_DIR [--layout rexseek|llava]
  chatrex-jax convert chatrex --from OFFICIAL_DIR --to OUT_DIR --format orbax   # and back
  chatrex-jax convert upn --from upn_large.pth --to upn_flax.safetensors [--config large]
  chatrex-jax convert upn --from upn_flax.safetensors --to upn_large.pth        # and back
  chatrex-jax convert export --workdir RUN [--step N] --to OUT [--config FILE[:ARG]]

The direction is read from the source: an LLM folder whose tensors are keyed by Flax paths
('a/b/c', written by `convert llm`) goes back to HF names, any other goes to Flax; a ChatRex
folder with an Orbax `params/` sub-folder goes to the official layout. Every command prints
what it wrote. A wrong path or format exits with code 2 and a message, not a traceback.
--from, --to and --workdir may be object-store URLs (gs://...): a remote --from is downloaded to
a temporary folder, a remote --to is written locally and uploaded only when the conversion
succeeds (an existing one needs --overwrite, which replaces its files), and export reads a
remote workdir's checkpoint directly through Orbax.

Formats
* llm, Flax side: `llm.convert_hf_to_flax_checkpoint` (disk to disk, bounded memory);
  load it with `chatrex_jax.convert.llm.load_flax_checkpoint`.
* chatrex, Orbax side: OUT/config.json (the official config plus the vision-tower sizes),
  OUT/params/ (an Orbax `StandardCheckpointer` tree of the Flax params), tokenizer files.
* upn, Flax side: one safetensors file keyed by Flax paths (metadata format chatrex-jax-flax);
  official side: `.pth` ({"model": state_dict}, read with weights_only=True) or `.safetensors`.
* export: the latest (or --step) checkpoint of a `chatrex-jax train` workdir, trainable and
  frozen parameters merged, written in the official layout (chatrex: a folder with config.json,
  safetensors and the training tokenizer, loadable by `chatrex-jax predict`; upn: a .pth or
  .safetensors file). The model config is the workdir's config.json unless --config is given.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import pickle
import shutil
import sys
from typing import Iterable

import numpy as np

from chatrex_jax import storage
from chatrex_jax.errors import UserError, command

# Files a checkpoint folder carries that are rewritten, never copied verbatim.
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".pth", ".pt")


class UsageError(UserError):
  """A user mistake (wrong path, format or option): reported in one line, exit code 2."""


# ----------------------------------------------------------------------------- helpers

def _folder(path: str, what: str, *, needs_config: bool = True) -> pathlib.Path:
  """An existing checkpoint folder, or a UsageError naming what is wrong with it."""
  p = pathlib.Path(path)
  if not p.exists():
    raise UsageError(f"{p} does not exist (expected {what})")
  if p.is_file():
    raise UsageError(f"{p} is a file; expected {what}")
  if needs_config and not (p / "config.json").exists():
    raise UsageError(f"{p} has no config.json; expected {what}")
  return p


def _output_folder(dst: str, src: pathlib.Path, overwrite: bool) -> pathlib.Path:
  """A destination folder that is empty, or whose stale weight files --overwrite removes.

  Stale shards must go: a leftover index would make readers pick the old tensors."""
  out = pathlib.Path(dst)
  if out.exists() and out.is_file():
    raise UsageError(f"--to {out} is a file; expected a folder (it is created if missing)")
  if out.resolve() == src.resolve():
    raise UsageError(f"--to {out} is the source folder; write to another folder")
  if out.exists() and any(out.iterdir()):
    if not overwrite:
      raise UsageError(f"--to {out} exists and is not empty; pass --overwrite to replace its weights")
    for f in out.iterdir():
      if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES + (".partial",)):
        f.unlink()
    from chatrex_jax.convert.chatrex import ORBAX_PARAMS
    if (out / ORBAX_PARAMS).is_dir():
      shutil.rmtree(out / ORBAX_PARAMS)
  out.mkdir(parents=True, exist_ok=True)
  return out


def _copy_side_files(src: pathlib.Path, dst: pathlib.Path, skip: Iterable[str] = ("config.json",)) -> list[str]:
  """Copies tokenizer and other non-weight files (generation_config.json, ...) along."""
  copied = []
  for f in sorted(src.iterdir()):
    if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in skip:
      shutil.copy2(f, dst / f.name)
      copied.append(f.name)
  return copied


def _human(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n} B"


def _report(path: pathlib.Path, tensors: int, extra: Iterable[str] = ()) -> None:
  """Prints `wrote PATH: N tensors, X bytes` and the files there."""
  files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
  total = sum(f.stat().st_size for f in files)
  print(f"wrote {path}: {tensors} tensors, {total} bytes ({_human(total)}) in {len(files)} files")
  if path.is_dir():
    top = sorted(f.name + ("/" if f.is_dir() else "") for f in path.iterdir())
    print("  " + ", ".join(top))
  for line in extra:
    print("  " + line)


def _count_leaves(tree) -> int:
  from chatrex_jax.convert.mapping import flatten
  return len(flatten(tree))


# ----------------------------------------------------------------------------- llm

def run_llm(args) -> int:
  from chatrex_jax.convert import gguf, mapping, safetensors_io
  from chatrex_jax.convert import llm as llm_convert
  from chatrex_jax.models.llm import LLMConfig
  if gguf.is_gguf(args.src):
    return run_gguf(args)
  src = _folder(args.src, "an LLM checkpoint folder (config.json + *.safetensors), or a .gguf file")
  ckpt = _open_checkpoint(src)
  to_flax = not mapping.is_flax_keyed(ckpt)
  ckpt.close()
  dst = _output_folder(args.dst, src, args.overwrite)
  max_shard = int(args.max_shard_mb * 2**20)
  if to_flax:
    llm_convert.convert_hf_to_flax_checkpoint(src, dst, max_shard_bytes=max_shard)
    direction = "HF -> Flax (load with chatrex_jax.convert.llm.load_flax_checkpoint)"
  else:
    config = LLMConfig.from_hf(llm_convert.read_hf_config(src),
                               tokenizer_class=llm_convert.tokenizer_class(src))
    params = llm_convert.load_flax_checkpoint(src)
    llm_convert.save(params, config, dst, max_shard_bytes=max_shard)
    direction = "Flax -> HF (transformers.AutoModelForCausalLM.from_pretrained loads it)"
  copied = _copy_side_files(src, dst)
  out = safetensors_io.Checkpoint(dst)
  n = len(out)
  out.close()
  _report(dst, n, [direction] + ([f"copied {', '.join(copied)}"] if copied else []))
  return 0


def run_gguf(args) -> int:
  """A llama.cpp GGUF file -> HF folder (float32 safetensors, config.json, tokenizer)."""
  from chatrex_jax.convert import gguf, safetensors_io
  from chatrex_jax.convert.mapping import ConversionError
  src = pathlib.Path(args.src)
  dst = _output_folder(args.dst, src, args.overwrite)
  try:
    gguf.convert_to_hf(src, dst, max_shard_bytes=int(args.max_shard_mb * 2**20))
  except (gguf.GGUFError, ConversionError) as e:
    raise UsageError(str(e)) from None
  out = safetensors_io.Checkpoint(dst)
  n = len(out)
  out.close()
  _report(dst, n, ["GGUF -> HF (dequantised to float32; transformers.AutoModelForCausalLM and "
                   "chatrex_jax.convert.llm.load read it)"])
  return 0


def _open_checkpoint(path: pathlib.Path):
  from chatrex_jax.convert import safetensors_io
  try:
    return safetensors_io.Checkpoint(path)
  except FileNotFoundError as e:
    raise UsageError(str(e)) from None


# ----------------------------------------------------------------------------- chatrex

def run_chatrex(args) -> int:
  from chatrex_jax.convert import chatrex as chatrex_convert
  from chatrex_jax.convert import safetensors_io
  from chatrex_jax.convert.mapping import ConversionError
  src = _folder(args.src, "a ChatRex checkpoint folder (config.json + *.safetensors) or an Orbax "
                "params dir (config.json + params/)")
  dst = _output_folder(args.dst, src, args.overwrite)
  notes = []
  if chatrex_convert.is_orbax_dir(src):
    if args.format == "orbax":
      raise UsageError(f"{src} is already an Orbax params dir; use --format official")
    try:
      config, params = chatrex_convert.load_orbax(src)
    except ConversionError:
      raise
    except ValueError as e:
      raise UsageError(f"{src}: {e}") from None
    layout = args.layout or "rexseek"
    notes.append(f"Orbax -> official ({layout} layout)")
  else:
    config, params, found = chatrex_convert.load(src)
    layout = args.layout or found
    notes.append(f"official ({found} layout) -> "
                 + ("Orbax params" if args.format == "orbax" else f"official ({layout} layout)"))
  if args.format == "orbax":
    chatrex_convert.save_orbax(params, config, dst)
    count = _count_leaves(params)
  else:
    chatrex_convert.save(params, config, dst, layout=layout,
                                    max_shard_bytes=int(args.max_shard_mb * 2**20))
    out = safetensors_io.Checkpoint(dst)
    count = len(out)
    out.close()
  copied = _copy_side_files(src, dst)
  if copied:
    notes.append(f"copied {', '.join(copied)}")
  _report(dst, count, notes)
  return 0


# ----------------------------------------------------------------------------- upn

def _upn_config(spec: str):
  from chatrex_jax.inference.upn_predict import load_config
  try:
    return load_config(spec)
  except FileNotFoundError as e:
    raise UsageError(str(e)) from None


def _official_file(path: pathlib.Path, what: str) -> str:
  """'pth' or 'safetensors' from the file name (a UsageError for anything else)."""
  from chatrex_jax.convert import upn as upn_convert
  try:
    return upn_convert.official_format(path)
  except ValueError:
    raise UsageError(f"{what} {path}: expected a .pth/.pt or .safetensors file name") from None


def run_upn(args) -> int:
  from chatrex_jax.convert import mapping, torch_files
  from chatrex_jax.convert import upn as upn_convert
  src, dst = pathlib.Path(args.src), pathlib.Path(args.dst)
  if not src.exists():
    raise UsageError(f"{src} does not exist (expected a UPN checkpoint file: .pth or .safetensors)")
  if src.is_dir():
    raise UsageError(f"{src} is a folder; expected a UPN checkpoint file (.pth or .safetensors)")
  if dst.exists() and dst.is_dir():
    raise UsageError(f"--to {dst} is a folder; expected a file name (.pth or .safetensors)")
  if dst.exists() and not args.overwrite:
    raise UsageError(f"--to {dst} exists; pass --overwrite to replace it")
  if dst.resolve() == src.resolve():
    raise UsageError(f"--to {dst} is the source file; write to another file")
  _official_file(src, "--from")
  config = _upn_config(args.config)
  notes = []
  if upn_convert.is_flax_file(src):
    params = upn_convert.load_flax(src)
    state = upn_convert.to_torch(params, config)
    if _official_file(dst, "--to") == "safetensors" and args.format == "flax":
      raise UsageError(f"{src} is already a Flax-keyed UPN file; give --to a .pth or leave --format out")
    upn_convert.save_state(state, dst)
    count = len(state)
    notes.append("Flax -> official (torch key names, shared box MLP under every alias, "
                 "relative_position_index buffers)")
  else:
    try:
      state, extras = torch_files.read_checkpoint(src, safe_globals=args.safe_globals)
    except mapping.ConversionError as e:   # objects outside the weights-only allowlist
      raise UsageError(str(e)) from None
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # torch.load's refusals
      raise UsageError(f"{src}: not a readable PyTorch checkpoint with plain tensors "
                       f"(read with weights_only=True): {str(e).splitlines()[0]}") from None
    params, report = upn_convert.to_flax(state, config, strict=False)
    report.extras = extras
    del state
    if report.unexpected and args.strict:
      raise UsageError(f"{src}: {report} (drop --strict to skip them, as the official load does)")
    if args.format == "official":
      state = upn_convert.to_torch(params, config)
      upn_convert.save_state(state, dst)
      count = len(state)
      notes.append("official -> official")
    else:
      if dst.suffix != ".safetensors":
        raise UsageError(f"--to {dst}: the Flax-keyed UPN file is safetensors; name it *.safetensors "
                         "(or pass --format official to write a .pth)")
      upn_convert.save_flax(params, dst)
      count = _count_leaves(params)
      notes.append("official -> Flax (keys are Flax paths; chatrex_jax.convert.mapping.unflatten "
                   "of safetensors_io.load_file gives the params)")
    if report.unexpected or report.missing_aliases or report.filled or report.extras:
      notes.append(f"skipped: {report}")
  _report(dst, count, notes)
  return 0


# ----------------------------------------------------------------------------- export

def _training_config(args):
  """The run's config: --config FILE[:ARG] (+ overrides), else WORKDIR/config.json."""
  import ml_collections

  from chatrex_jax.configs import apply_overrides, load_config
  if args.config:
    try:
      return load_config(args.config, args.overrides)
    except (FileNotFoundError, KeyError) as e:
      raise UsageError(str(e).strip("'\"")) from None
  saved = storage.path(args.workdir) / "config.json"
  if not saved.exists():
    raise UsageError(f"{saved} not found: give the run's training config with --config FILE[:ARG]")
  config = ml_collections.ConfigDict(json.loads(saved.read_text()))
  try:
    apply_overrides(config, args.overrides)
  except (ValueError, KeyError) as e:
    raise UsageError(str(e).strip("'\"")) from None
  return config


def run_export(args) -> int:
  from chatrex_jax.inference.upn_export import load_trained_params
  workdir = storage.path(args.workdir)   # local or gs://
  if not workdir.is_dir():
    raise UsageError(f"--workdir {workdir} is not a folder (expected a `chatrex-jax train` workdir)")
  if not (workdir / "checkpoints").is_dir():
    raise UsageError(f"{workdir} has no checkpoints/ folder: not a `chatrex-jax train` workdir "
                     "(or no checkpoint was saved yet)")
  steps = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
  if args.step is not None and args.step not in steps:
    raise UsageError(f"{workdir / 'checkpoints'} has no step {args.step}; saved steps: {steps or 'none'}")
  config = _training_config(args)
  kind = args.kind or config.get("task", None)
  if kind not in ("chatrex", "upn"):
    raise UsageError(f"cannot tell the model: config.task is {kind!r}; pass --kind chatrex|upn")
  try:
    params = load_trained_params(workdir, args.step)
  except FileNotFoundError as e:
    raise UsageError(str(e)) from None
  except (ValueError, KeyError) as e:  # orbax: an unknown step
    raise UsageError(f"{workdir}: cannot restore step {args.step}: {e}") from None
  import jax
  params = jax.tree.map(np.asarray, params)
  if kind == "upn":
    return _export_upn(args, config, params)
  return _export_chatrex(args, config, params)


def _export_upn(args, config, params) -> int:
  from chatrex_jax.convert import upn as upn_convert
  from chatrex_jax.train.upn_task import model_config as upn_model_config
  dst = pathlib.Path(args.dst)
  _official_file(dst, "--to (a UPN export is one file)")
  if dst.exists() and not args.overwrite:
    raise UsageError(f"--to {dst} exists; pass --overwrite to replace it")
  model = upn_model_config(config.model)
  state = upn_convert.to_torch(params, model)
  upn_convert.save_state(state, dst)
  _report(dst, len(state), [f"training checkpoint ({args.workdir}) -> official UPN",
                            "use it with `python -m chatrex_jax.inference.upn_predict --upn "
                            f"{dst} --config FILE[:ARG]` (the run's model section)"])
  return 0


def _export_chatrex(args, config, params) -> int:
  from chatrex_jax.convert import chatrex as chatrex_convert
  from chatrex_jax.convert import safetensors_io
  from chatrex_jax.train.mllm_task import model_config
  tokenizer, notes = None, []
  tok_dir = config.data.get("tokenizer_dir", "") if "data" in config else ""
  if tok_dir:
    if not storage.path(tok_dir).is_dir():
      raise UsageError(f"config.data.tokenizer_dir {tok_dir} is not a folder: set "
                       "--config.data.tokenizer_dir to the tokenizer the run trained with")
    from chatrex_jax.protocol.tokenize import load_tokenizer
    tokenizer = load_tokenizer(tok_dir)
  try:
    model = model_config(config.model, len(tokenizer) if tokenizer is not None else None)
  except ValueError as e:
    raise UsageError(str(e)) from None
  if tokenizer is None:
    notes.append("no tokenizer (config.data.tokenizer_dir is empty): copy one into the folder "
                 "before `chatrex-jax predict`")
  dst = _output_folder(args.dst, pathlib.Path(args.workdir), args.overwrite)
  chatrex_convert.save(params, model, dst, layout=args.layout or "rexseek",
                       max_shard_bytes=int(args.max_shard_mb * 2**20), tokenizer=tokenizer)
  out = safetensors_io.Checkpoint(dst)
  count = len(out)
  out.close()
  notes.insert(0, f"training checkpoint ({args.workdir}) -> official ({args.layout or 'rexseek'} layout); "
               "ChatRexPipeline.from_checkpoint / `chatrex-jax predict` load it")
  _report(dst, count, notes)
  return 0


# ----------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="chatrex-jax convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True, metavar="{llm,chatrex,upn,export}")

  def common(sp, shards=True):
    sp.add_argument("--overwrite", action="store_true", help="replace existing weights at --to")
    if shards:
      sp.add_argument("--max-shard-mb", type=float, default=5 * 1024,
                      help="largest safetensors shard written (MiB, default 5120)")

  sp = sub.add_parser("llm", help="HF Qwen2/LLaMA folder <-> Flax-keyed safetensors folder; "
                      "GGUF file -> HF folder")
  sp.add_argument("--from", dest="src", required=True,
                  help="HF folder, a `convert llm` output, or a llama.cpp .gguf file")
  sp.add_argument("--to", dest="dst", required=True, help="output folder")
  common(sp)
  sp.set_defaults(run=run_llm)

  sp = sub.add_parser("chatrex", help="ChatRex/RexSeek folder: re-layout, or <-> Orbax params dir")
  sp.add_argument("--from", dest="src", required=True, help="official folder or Orbax params dir")
  sp.add_argument("--to", dest="dst", required=True, help="output folder")
  sp.add_argument("--layout", choices=("rexseek", "llava"), default=None,
                  help="official key layout written (default: the source's, rexseek from Orbax)")
  sp.add_argument("--format", choices=("official", "orbax"), default="official",
                  help="official = config.json + safetensors; orbax = config.json + params/")
  common(sp)
  sp.set_defaults(run=run_chatrex)

  sp = sub.add_parser("upn", help="official upn_large.pth/.safetensors <-> Flax-keyed safetensors")
  sp.add_argument("--from", dest="src", required=True, help=".pth / .safetensors file")
  sp.add_argument("--to", dest="dst", required=True, help=".safetensors (Flax) or .pth/.safetensors (official)")
  sp.add_argument("--config", default="large", help="large | tiny | FILE[:ARG] with a model section")
  sp.add_argument("--format", choices=("flax", "official"), default="flax",
                  help="what an official source becomes (a Flax source always becomes official)")
  sp.add_argument("--strict", action="store_true", help="refuse checkpoint keys the model does not use")
  sp.add_argument("--safe-globals", nargs="*", default=(), metavar="MODULE.CLASS",
                  help="classes a trusted .pth may pickle besides tensors (e.g. argparse.Namespace); "
                       "the file is still read with weights_only=True")
  common(sp, shards=False)
  sp.set_defaults(run=run_upn)

  sp = sub.add_parser("export", help="a training workdir's checkpoint -> official layout")
  sp.add_argument("--workdir", required=True, help="`chatrex-jax train` workdir")
  sp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  sp.add_argument("--to", dest="dst", required=True, help="folder (chatrex) or .pth/.safetensors (upn)")
  sp.add_argument("--config", default="", help="training config FILE[:ARG] (default: WORKDIR/config.json)")
  sp.add_argument("--kind", choices=("chatrex", "upn"), default=None, help="default: config.task")
  sp.add_argument("--layout", choices=("rexseek", "llava"), default=None, help="chatrex key layout")
  common(sp)
  sp.set_defaults(run=run_export)
  return p


def _run_staged(args) -> int:
  """Runs the command on local paths: a gs:// --from is downloaded first; a gs:// --to is
  written locally and uploaded only when the conversion succeeds (shard indexes last),
  replacing what was there with --overwrite. `export` reads a gs:// --workdir directly."""
  with contextlib.ExitStack() as stack:
    if getattr(args, "src", None):
      args.src = stack.enter_context(storage.local_input(args.src))
    if storage.is_remote(args.dst):
      if storage.exists_nonempty(args.dst) and not args.overwrite:
        raise UsageError(f"--to {args.dst} exists and is not empty; pass --overwrite to replace it")
      args.dst = stack.enter_context(storage.local_output(args.dst, replace=True))
    code = int(args.run(args) or 0)
    if code:
      raise UsageError(f"failed with exit status {code}; --to was left as it was")
  return code


@command("convert")
def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  from chatrex_jax.configs import split_overrides
  argv, overrides = split_overrides(argv)
  parser = _parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # argparse printed the usage problem (or --help)
    return e.code if isinstance(e.code, int) else 2
  args.overrides = overrides
  if overrides and args.command != "export":
    print(f"chatrex-jax convert {args.command}: error: --config.key=value overrides apply to "
          "`export` only", file=sys.stderr)
    return 2
  from chatrex_jax.convert.mapping import ConversionError
  try:
    return _run_staged(args)
  except (UsageError, ConversionError, FileNotFoundError, NotADirectoryError) as e:
    print(f"chatrex-jax convert {args.command}: error: {e}", file=sys.stderr)
    return 2
  except ValueError as e:  # the converters' format checks (not a ChatRex checkpoint, ...)
    print(f"chatrex-jax convert {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
