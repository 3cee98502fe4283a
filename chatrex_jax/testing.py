"""Helpers for equivalence tests and the golden fixtures (no pytest dependency)."""
from __future__ import annotations

import contextlib
import os
import pathlib

import numpy as np

# tests/ is not part of the wheel: the shipped fixtures exist only in a source checkout (or an
# editable install, whose package path points into one).
SHIPPED_GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "tests" / "golden"


def golden_root() -> pathlib.Path | None:
  """The golden fixtures folder: $CHATREX_GOLDEN if set, else the checkout's `tests/golden`.

  Returns None when the chosen folder does not exist; `require_golden_root` says why.
  """
  env = os.environ.get("CHATREX_GOLDEN")
  if env:
    path = pathlib.Path(env)
    return path if path.is_dir() else None
  return SHIPPED_GOLDEN if (SHIPPED_GOLDEN / "README.md").is_file() else None


def require_golden_root() -> pathlib.Path:
  """`golden_root()`, or FileNotFoundError naming what to set."""
  path = golden_root()
  if path is not None:
    return path
  env = os.environ.get("CHATREX_GOLDEN")
  if env:
    raise FileNotFoundError(f"CHATREX_GOLDEN={env} is not a folder: point it at the golden "
                            "fixtures (tests/golden of a chatrex-jax source checkout)")
  raise FileNotFoundError(
      f"golden fixtures not found at {SHIPPED_GOLDEN}: they ship in tests/golden of the source "
      "checkout, not in the wheel; run from a checkout (pip install -e .) or set "
      "CHATREX_GOLDEN to a checkout's tests/golden")


def golden_fixtures(root: pathlib.Path) -> list[pathlib.Path]:
  """Every fixture folder under `root`, sorted (files such as README.md are not fixtures)."""
  return sorted(p for p in pathlib.Path(root).iterdir()
                if p.is_dir() and not p.name.startswith((".", "__")))


def max_errors(got, want) -> tuple[float, float]:
  """(max abs error, max error relative to the reference's scale = max |want|)."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  if got.shape != want.shape:
    raise AssertionError(f"shape {got.shape} != reference shape {want.shape}")
  if want.size == 0:
    return 0.0, 0.0
  abs_err = float(np.max(np.abs(got - want)))
  scale = float(np.max(np.abs(want)))
  return abs_err, abs_err / max(scale, 1e-30)


def assert_close_to_scale(got, want, rel: float, what: str = "output") -> float:
  """Asserts max|got - want| <= rel * max|want| ('of output scale' in docs/architecture.md "Numeric tolerances")."""
  abs_err, rel_err = max_errors(got, want)
  if not rel_err <= rel:
    raise AssertionError(f"{what}: max abs {abs_err:.3g} = {rel_err:.3g} of scale > {rel:g}")
  return rel_err


@contextlib.contextmanager
def highest_precision():
  import jax
  with jax.default_matmul_precision("highest"):
    yield


def torch_to_numpy_state(module) -> dict[str, np.ndarray]:
  """A torch module's state dict as numpy arrays (detached copies)."""
  return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def torch_ms_deform_attn_core(value, shapes, loc, attn):
  """Deformable DETR's `ms_deform_attn_core_pytorch` (the UPN fallback), written with
  F.grid_sample: the PyTorch reference of `ops.ms_deform_attn` for tests and benchmarks.

  value [B, S, N, C], shapes [(H, W)] per level, loc [B, Q, N, L, P, 2] in [0, 1],
  attn [B, Q, N, L, P] (torch tensors) -> [B, Q, N * C].
  """
  import torch
  import torch.nn.functional as F
  b, _, n, c = value.shape
  _, q, _, nl, p, _ = loc.shape
  values = value.split([h * w for h, w in shapes], dim=1)
  grids = 2 * loc - 1
  samples = []
  for lvl, (h, w) in enumerate(shapes):
    v = values[lvl].flatten(2).transpose(1, 2).reshape(b * n, c, h, w)
    g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
    samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
  a = attn.transpose(1, 2).reshape(b * n, 1, q, nl * p)
  out = (torch.stack(samples, dim=-2).flatten(-2) * a).sum(-1).view(b, n * c, q)
  return out.transpose(1, 2).contiguous()


def make_release_checkpoint(dst, sentencepiece_model, *, seed: int = 0, hidden: int = 32):
  """A tiny ChatRex checkpoint in the layout and family of the released ChatRex-7B: RexSeek
  key layout (top-level `mm_projector.*`, `vision_tower.*`, `vision_tower_aux.*`), a LLaMA LLM
  without q/k/v bias over a 32000-piece sentencepiece vocabulary with ChatRex's 104 tokens at
  32000-32103, config.json saying only `model_type: "chatrex"` about the family (no
  architectures, no attention_bias: the family must come from the weights and the tokenizer).
  Returns (folder, ChatRexConfig, params)."""
  import dataclasses
  import json

  from flax.core import meta
  import jax

  from chatrex_jax.convert import chatrex as chatrex_convert
  from chatrex_jax.models.chatrex import init_params
  from chatrex_jax.models.tiny import tiny_config
  from chatrex_jax.protocol import tokens as C
  from chatrex_jax.protocol.llama_tokenizer import SentencePieceLlamaTokenizer
  dst = pathlib.Path(dst)
  tok = SentencePieceLlamaTokenizer(vocab_file=str(sentencepiece_model))
  tok.add_tokens(list(C.SPECIAL_TOKENS), special_tokens=True)
  config = tiny_config(len(tok), family="llama", hidden=hidden, rms_norm_eps=1e-5)
  config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, model_type="chatrex"))
  params = meta.unbox(init_params(config, jax.random.key(seed)))["params"]
  chatrex_convert.save(params, config, dst, tokenizer=tok)
  hf = json.loads((dst / "config.json").read_text())
  for key in ("architectures", "attention_bias"):
    hf.pop(key, None)
  (dst / "config.json").write_text(json.dumps(hf, indent=2))
  return dst, config, params
