"""Declarative torch <-> Flax key maps with per-key transforms (MaxText `param_mapping` style).

A converter for one model family is a function `config -> list[Rule]`: each rule pairs one
torch key with one Flax parameter path and names the transform between the two layouts.
The generic engine below does the rest for every family:

* `to_flax(state, rules, expected)` pulls tensors one at a time from `state` (a dict or a
  lazy `safetensors_io.Checkpoint`), transforms them and builds the nested Flax tree. Every
  missing, unexpected or mis-shaped key is collected and reported in one `ConversionError`.
* `to_torch(params, rules)` yields `(torch_key, array)` pairs lazily, so writers can stream.

Transforms are plain numpy functions and exact (transposes/reshapes only), so a round trip is
bit-identical.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from chatrex_jax.errors import UserError

Array = np.ndarray
Transform = Callable[[Array], Array]

# Metadata tag of this project's safetensors files keyed by Flax paths ('a/b/c').
FLAX_FORMAT = "chatrex-jax-flax"


def _identity(x: Array) -> Array:
  return x


@dataclasses.dataclass(frozen=True)
class Layout:
  """A pair of inverse transforms between the torch and the Flax layout of one tensor."""
  name: str
  to_flax: Transform
  to_torch: Transform


IDENTITY = Layout("identity", _identity, _identity)
# nn.Linear weight [out, in] <-> Dense kernel [in, out].
LINEAR = Layout("linear", lambda w: np.ascontiguousarray(w.T), lambda k: np.ascontiguousarray(k.T))
# nn.Conv2d weight [O, I, kh, kw] <-> Conv kernel [kh, kw, I, O].
CONV2D = Layout("conv2d", lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
                lambda k: np.ascontiguousarray(k.transpose(3, 2, 0, 1)))


def linear_to_heads(num_heads: int) -> Layout:
  """nn.Linear [N*H, D] <-> DenseGeneral kernel [D, N, H] (per-head projections)."""
  def fwd(w):
    return np.ascontiguousarray(w.T.reshape(w.shape[1], num_heads, -1))

  def back(k):
    return np.ascontiguousarray(k.reshape(k.shape[0], -1).T)
  return Layout(f"linear_to_heads({num_heads})", fwd, back)


def bias_to_heads(num_heads: int) -> Layout:
  """bias [N*H] <-> [N, H]."""
  return Layout(f"bias_to_heads({num_heads})", lambda b: np.ascontiguousarray(b.reshape(num_heads, -1)),
                lambda b: np.ascontiguousarray(b.reshape(-1)))


def heads_to_linear(num_heads: int) -> Layout:
  """Output projection nn.Linear [D, N*H] <-> DenseGeneral kernel [N, H, D]."""
  def fwd(w):
    return np.ascontiguousarray(w.T.reshape(num_heads, -1, w.shape[0]))

  def back(k):
    return np.ascontiguousarray(k.reshape(-1, k.shape[-1]).T)
  return Layout(f"heads_to_linear({num_heads})", fwd, back)


def rows_to_heads(num_heads: int) -> Layout:
  """nn.Linear [N*H, D] <-> out-first per-head kernel [N, H, D] (a reshape, no transpose)."""
  return Layout(f"rows_to_heads({num_heads})", lambda w: w.reshape(num_heads, -1, w.shape[-1]),
                lambda k: k.reshape(-1, k.shape[-1]))


def cols_to_heads(num_heads: int) -> Layout:
  """Output projection nn.Linear [D, N*H] <-> out-first kernel [D, N, H] (a reshape)."""
  return Layout(f"cols_to_heads({num_heads})", lambda w: w.reshape(w.shape[0], num_heads, -1),
                lambda k: k.reshape(k.shape[0], -1))


@dataclasses.dataclass(frozen=True)
class Rule:
  """torch key <-> Flax path ('a/b/c'), with the layout transform and optional aliases.

  aliases: other torch keys holding the same tensor (modules shared under several names).
  Reading takes the first key present and checks the others are equal; writing emits all.
  fill_if_missing: for a parameter the forward never reads (UPN's `ref_point_head_point`,
  multiplied by zero; CLIP's `post_layernorm`, which only the unused pooled output passes):
  the Flax value to use when a checkpoint lacks it (reported, not an error).
  """
  torch_key: str
  flax_path: str
  layout: Layout = IDENTITY
  aliases: tuple[str, ...] = ()
  fill_if_missing: Callable[[], Array] | None = dataclasses.field(default=None, compare=False)

  @property
  def torch_keys(self) -> tuple[str, ...]:
    return (self.torch_key,) + tuple(self.aliases)


class ConversionError(UserError, ValueError):
  """Raised with every problem of one conversion listed at once."""

  def __init__(self, what: str, missing=(), unexpected=(), misshaped=(), other=()):
    self.missing, self.unexpected = list(missing), list(unexpected)
    self.misshaped, self.other = list(misshaped), list(other)
    parts = [f"{what}: the checkpoint does not match the model."]

    def block(title, items):
      if items:
        shown = items[:50]
        more = f"\n    ... and {len(items) - 50} more" if len(items) > 50 else ""
        parts.append(f"  {title} ({len(items)}):\n    " + "\n    ".join(map(str, shown)) + more)
    block("missing keys", self.missing)
    block("unexpected keys", self.unexpected)
    block("mis-shaped keys", self.misshaped)
    block("other problems", self.other)
    parts.append("  Check that the config matches the checkpoint (sizes, layer count, family).")
    super().__init__("\n".join(parts))


def flatten(tree: Mapping) -> dict[str, object]:
  """Nested dicts -> {'a/b/c': leaf}; empty sub-dicts vanish (`unflatten` is the inverse)."""
  from flax import traverse_util
  return traverse_util.flatten_dict(tree if isinstance(tree, dict) else dict(tree), sep="/")


def unflatten(flat: Mapping[str, object]) -> dict:
  """{'a/b/c': leaf} -> nested dicts."""
  from flax import traverse_util
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def is_flax_keyed(names: Iterable[str]) -> bool:
  """Flax-path keys ('a/b/c', 'level_embed') vs torch keys ('a.b.c'): a torch state dict
  names every tensor module.attribute, a Flax path never holds a dot."""
  names = list(names)
  return bool(names) and not any("." in n for n in names)


def unused_keys(keys: Iterable[str], rules: Sequence[Rule], ignore: Iterable[str] = ()) -> list[str]:
  """The torch keys (in `keys` order) that no rule reads and no glob in `ignore` covers."""
  used = {k for r in rules for k in r.torch_keys}
  ignore = tuple(ignore)
  return [k for k in keys if k not in used and not any(fnmatch.fnmatchcase(k, pat) for pat in ignore)]


def _shape_of(x) -> tuple[int, ...]:
  return tuple(getattr(x, "shape", np.shape(x)))


def to_flax(state: Mapping[str, Array], rules: Sequence[Rule], *, what: str = "conversion",
            expected: Mapping | None = None, ignore: Iterable[str] = (),
            dtype: np.dtype | None = None, strict: bool = True,
            filled: list[str] | None = None) -> dict:
  """Builds the Flax tree from a torch-named state dict.

  expected: an (abstract) Flax tree, e.g. `jax.eval_shape(model.init, ...)["params"]`; each
    converted tensor's shape is checked against it and Flax paths it has that no rule fills
    are reported missing.
  ignore: glob patterns of torch keys that may be present without a rule (buffers etc.).
  dtype: cast floating tensors to this dtype (None keeps the checkpoint's).
  strict: report unexpected torch keys (False: ignore them, as `strict=False` loading does).
  filled: receives the torch keys of absent parameters taken from their `fill_if_missing`
    (when None, they are listed in one warning).
  """
  if expected is not None:
    from flax.core import meta  # boxed (logically partitioned) trees from `init`/`eval_shape`
    expected = meta.unbox(expected)
  expected_flat = flatten(expected) if expected is not None else None
  missing, misshaped, other, out = [], [], [], {}
  filled_here: list[str] = []
  for rule in rules:
    present = [k for k in rule.torch_keys if k in state]
    if not present and rule.fill_if_missing is not None:
      out[rule.flax_path] = np.asarray(rule.fill_if_missing())
      filled_here.append(rule.torch_key)
      continue
    if not present:
      missing.append(rule.torch_key + (f" (or aliases {list(rule.aliases)})" if rule.aliases else ""))
      continue
    value = np.asarray(state[present[0]])
    for alias in present[1:]:
      if not np.array_equal(np.asarray(state[alias]), value):
        other.append(f"{alias} differs from {present[0]}: they should be one shared tensor")
    try:
      converted = rule.layout.to_flax(value)
    except ValueError as e:
      misshaped.append(f"{present[0]}: {_shape_of(value)} cannot take layout {rule.layout.name} ({e})")
      continue
    if expected_flat is not None:
      if rule.flax_path not in expected_flat:
        other.append(f"rule target {rule.flax_path} (from {present[0]}) is not a model parameter")
        continue
      want = _shape_of(expected_flat[rule.flax_path])
      if tuple(converted.shape) != want:
        misshaped.append(f"{present[0]}: checkpoint {_shape_of(value)} -> {tuple(converted.shape)}, "
                         f"model expects {want} at {rule.flax_path}")
        continue
    if dtype is not None and np.issubdtype(converted.dtype, np.floating):
      converted = converted.astype(dtype)
    out[rule.flax_path] = converted
  if expected_flat is not None:
    covered = {r.flax_path for r in rules}
    missing += [f"(no rule) {p}" for p in expected_flat if p not in covered]
  unexpected = unused_keys(state, rules, ignore) if strict else []
  if missing or unexpected or misshaped or other:
    raise ConversionError(what, missing, unexpected, misshaped, other)
  if filled is not None:
    filled.extend(filled_here)
  elif filled_here:
    import warnings
    warnings.warn(f"{what}: the checkpoint lacks {len(filled_here)} parameters the forward never "
                  f"reads; filled with their neutral values: {filled_here}", stacklevel=2)
  return unflatten(out)


def to_torch(params: Mapping, rules: Sequence[Rule], *, what: str = "conversion",
             dtype: np.dtype | None = None) -> Iterator[tuple[str, Array]]:
  """Yields (torch_key, array) for every rule (aliases included), one tensor at a time."""
  from flax.core import meta
  flat = flatten(meta.unbox(params))
  missing = [r.flax_path for r in rules if r.flax_path not in flat]
  unused = sorted(set(flat) - {r.flax_path for r in rules})
  if missing or unused:
    raise ConversionError(what, missing=[f"(flax) {p}" for p in missing],
                          unexpected=[f"(flax, no rule) {p}" for p in unused])
  for rule in rules:
    value = rule.layout.to_torch(np.asarray(flat[rule.flax_path]))
    if dtype is not None and np.issubdtype(value.dtype, np.floating):
      value = value.astype(dtype)
    for key in rule.torch_keys:
      yield key, value


def check_bijective(rules: Sequence[Rule]) -> None:
  """A key map must be one-to-one; called by tests of every family."""
  seen_t, seen_f = {}, {}
  for r in rules:
    for k in r.torch_keys:
      if k in seen_t:
        raise ValueError(f"torch key {k} mapped twice")
      seen_t[k] = r
    if r.flax_path in seen_f:
      raise ValueError(f"flax path {r.flax_path} mapped twice")
    seen_f[r.flax_path] = r


def expand(template: Sequence[tuple[str, str, Layout]], **ranges: int) -> list[Rule]:
  """Expands templates with `{i}`-style fields over `range(n)` for each named field."""
  rules = []
  for torch_key, flax_path, layout in template:
    fields = sorted(set(re.findall(r"\{(\w+)\}", torch_key)))
    combos = [{}]
    for f in fields:
      combos = [dict(c, **{f: i}) for c in combos for i in range(ranges[f])]
    rules += [Rule(torch_key.format(**c), flax_path.format(**c), layout) for c in combos]
  return rules


def check_tree(params: Mapping, expected: Mapping, what: str) -> None:
  """Flax params (e.g. restored from Orbax) vs the model's (abstract) parameter tree: every
  missing, unexpected and mis-shaped path in one `ConversionError`."""
  from flax.core import meta
  want = flatten(meta.unbox(expected))
  got = flatten(params)
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  misshaped = [f"{k}: {tuple(np.shape(got[k]))} vs model {tuple(want[k].shape)}"
               for k in sorted(set(want) & set(got)) if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if missing or unexpected or misshaped:
    raise ConversionError(what, missing, unexpected, misshaped)


# ----------------------------------------------------------------------------- rule builders
# The torch modules every family is made of, as rules. `torch_module` is the module's key
# without the trailing dot ("encoder.layers.0.mlp.fc1"), `flax_module` its Flax path
# ("layers_0/fc1"); the parameter names are appended as torch and Flax spell them.

def flax_scope(flax_prefix: str) -> str:
  """A Flax sub-tree to prefix paths with: "vision_tower" (or "vision_tower/") ->
  "vision_tower/"; "" (the tree's root) -> ""."""
  return flax_prefix.rstrip("/") + "/" if flax_prefix else ""


def linear_rules(torch_module: str, flax_module: str, *, bias: bool = True, layout: Layout = LINEAR,
                 bias_layout: Layout = IDENTITY) -> list[Rule]:
  """nn.Linear: `.weight` <-> `/kernel` (`layout`: transposed, or split into heads) and
  `.bias` <-> `/bias`."""
  out = [Rule(f"{torch_module}.weight", f"{flax_module}/kernel", layout)]
  if bias:
    out.append(Rule(f"{torch_module}.bias", f"{flax_module}/bias", bias_layout))
  return out


def norm_rules(torch_module: str, flax_module: str) -> list[Rule]:
  """nn.LayerNorm (and LayerNorm2d): `.weight` <-> `/scale`, `.bias` <-> `/bias`."""
  return [Rule(f"{torch_module}.weight", f"{flax_module}/scale"),
          Rule(f"{torch_module}.bias", f"{flax_module}/bias")]


def conv_rules(torch_module: str, flax_module: str) -> list[Rule]:
  """nn.Conv2d: `.weight` [O, I, kh, kw] <-> `/kernel` [kh, kw, I, O], `.bias` <-> `/bias`."""
  return [Rule(f"{torch_module}.weight", f"{flax_module}/kernel", CONV2D),
          Rule(f"{torch_module}.bias", f"{flax_module}/bias")]


def mlp_rules(torch_module: str, flax_module: str, num_layers: int) -> list[Rule]:
  """A DETR-style MLP (`.layers.{k}`, a list of nn.Linear) <-> `/layers_{k}`."""
  return [r for k in range(num_layers)
          for r in linear_rules(f"{torch_module}.layers.{k}", f"{flax_module}/layers_{k}")]
