"""Every family module in chatrex_jax.convert offers the same verbs with the same strictness:
`rules` (bijective), `to_flax` / `to_torch` (bit-identical round trip; an unexpected, missing or
mis-shaped tensor is one ConversionError), `load` / `save` (files in the official layout)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from chatrex_jax.convert import chatrex as chatrex_convert
from chatrex_jax.convert import clip as clip_convert
from chatrex_jax.convert import convnext as convnext_convert
from chatrex_jax.convert import llm as llm_convert
from chatrex_jax.convert import mapping, torch_files
from chatrex_jax.convert import projector as projector_convert
from chatrex_jax.convert import upn as upn_convert
from chatrex_jax.convert.mapping import ConversionError
from chatrex_jax.models.tiny import tiny_config
from chatrex_jax.models.upn.swin import SwinConfig
from chatrex_jax.models.upn.upn import UPNConfig
from tests.builders import assert_same_tree, random_like

CONFIG = tiny_config(96, family="llama")
UPN_TINY = UPNConfig(swin=SwinConfig(16, (1, 1, 1, 1), (1, 2, 4, 8), 7), d_model=32, d_ffn=64,
                     enc_layers=1, dec_layers=2, num_queries=16)


@dataclasses.dataclass
class Family:
  """One family's verbs bound to its config (and its sub-tree of the ChatRex params)."""
  name: str
  params: dict
  rules: list
  to_flax: object
  to_torch: object
  load: object
  save: object
  file: str


def _families() -> list[Family]:
  whole = random_like(chatrex_convert.abstract_params(CONFIG), seed=0)
  c = CONFIG
  upn_params = random_like(upn_convert.abstract_params(UPN_TINY), seed=1)
  return [
      Family("llm", whole["llm"], llm_convert.rules(c.llm),
             lambda s: llm_convert.to_flax(s, c.llm), lambda p: dict(llm_convert.to_torch(p, c.llm)),
             lambda path: llm_convert.load(path)[1], lambda p, path: llm_convert.save(p, c.llm, path), "hf"),
      Family("chatrex", whole, chatrex_convert.rules(c),
             lambda s: chatrex_convert.to_flax(s, c), lambda p: dict(chatrex_convert.to_torch(p, c)),
             lambda path: chatrex_convert.load(path)[1], lambda p, path: chatrex_convert.save(p, c, path),
             "chatrex"),
      Family("clip", whole["vision_tower"], clip_convert.rules(c.clip),
             lambda s: clip_convert.to_flax(s, c.clip), lambda p: clip_convert.to_torch(p, c.clip),
             lambda path: clip_convert.load(path, c.clip), lambda p, path: clip_convert.save(p, c.clip, path),
             "clip.safetensors"),
      Family("convnext", whole["vision_tower_aux"], convnext_convert.rules(c.convnext),
             lambda s: convnext_convert.to_flax(s, c.convnext),
             lambda p: convnext_convert.to_torch(p, c.convnext),
             lambda path: convnext_convert.load(path, c.convnext),
             lambda p, path: convnext_convert.save(p, c.convnext, path), "convnext.safetensors"),
      Family("projector", whole["mm_object_projector"], projector_convert.rules(),
             projector_convert.to_flax, projector_convert.to_torch, projector_convert.load,
             projector_convert.save, "projector.safetensors"),
      Family("upn", upn_params, upn_convert.rules(UPN_TINY),
             lambda s: upn_convert.to_flax(s, UPN_TINY)[0],
             lambda p: upn_convert.to_torch(p, UPN_TINY),
             lambda path: upn_convert.load(path, UPN_TINY)[0],
             lambda p, path: upn_convert.save(p, UPN_TINY, path), "upn.pth"),
  ]


FAMILIES = {f.name: f for f in _families()}


class Opaque:
  """An object torch's weights-only loader must refuse to unpickle."""


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> Family:
  return FAMILIES[request.param]


def test_rules_are_bijective(family):
  mapping.check_bijective(family.rules)


def test_in_memory_round_trip_is_bit_identical(family):
  state = family.to_torch(family.params)
  assert_same_tree(family.to_flax(state), family.params)


def test_files_round_trip_is_bit_identical(family, tmp_path):
  family.save(family.params, tmp_path / family.file)
  assert_same_tree(family.load(tmp_path / family.file), family.params)


def test_every_bad_tensor_is_reported_at_once(family):
  state = dict(family.to_torch(family.params))
  keys = sorted(k for k in state if k.endswith("weight") and np.ndim(state[k]) == 2)
  # the projector reads its sizes from its first Linear: drop its last bias instead
  dropped = keys[0] if family.name != "projector" else "mm_projector.2.bias"
  reshaped = keys[-1]
  del state[dropped]
  state[reshaped] = np.zeros((3, 5), np.float32)
  state["surplus.weight"] = np.zeros((2,), np.float32)
  with pytest.raises(ConversionError) as e:
    family.to_flax(state)
  message = str(e.value)
  assert dropped in message and reshaped in message and "surplus.weight" in message


def test_torch_files_are_read_weights_only(tmp_path):
  torch = pytest.importorskip("torch")
  state = projector_convert.to_torch(FAMILIES["projector"].params)
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}}, tmp_path / "p.pth")
  assert_same_tree(projector_convert.load(tmp_path / "p.pth"), FAMILIES["projector"].params)

  torch.save({"model": {}, "args": Opaque()}, tmp_path / "opaque.pth")
  with pytest.raises(ConversionError, match="weights-only allowlist"):
    torch_files.read_checkpoint(tmp_path / "opaque.pth")


def test_upn_flax_file_and_orbax_round_trips(tmp_path):
  upn = FAMILIES["upn"].params
  upn_convert.save_flax(upn, tmp_path / "upn_flax.safetensors")
  assert upn_convert.is_flax_file(tmp_path / "upn_flax.safetensors")
  assert_same_tree(upn_convert.load_flax(tmp_path / "upn_flax.safetensors", UPN_TINY), upn)

  whole = FAMILIES["chatrex"].params
  chatrex_convert.save_orbax(whole, CONFIG, tmp_path / "orbax")
  assert chatrex_convert.is_orbax_dir(tmp_path / "orbax")
  config, params = chatrex_convert.load_orbax(tmp_path / "orbax")
  assert config == CONFIG
  assert_same_tree(params, whole)
