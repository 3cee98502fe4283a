"""Golden PartitionSpecs of every ChatRex-7B parameter (stage 2) on reference 128-device meshes.

The golden (tests/golden/chatrex_7b_partition_specs.json) is written by
`python -m chatrex_jax.tools.aot --write-golden tests/golden/chatrex_7b_partition_specs.json`;
regenerate it only for an intended change of the model, the config or the logical rules, and
review the diff. Everything here is `jax.eval_shape` only: no 7B parameter is allocated.
"""
import copy
import json
import math
import pathlib

import pytest

from chatrex_jax.tools import aot

GOLDEN = pathlib.Path(__file__).parent / "golden" / "chatrex_7b_partition_specs.json"
REGENERATE = f"python -m chatrex_jax.tools.aot --write-golden {GOLDEN.relative_to(GOLDEN.parents[2])}"


@pytest.fixture(scope="module")
def golden() -> dict:
  return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def actual() -> dict:
  return aot.golden_specs()


def test_partition_specs_match_golden(golden, actual):
  diff = aot.diff_specs(golden, actual)
  assert not diff, (f"{len(diff)} partition-spec differences against {GOLDEN.name} "
                    f"(if intended, run `{REGENERATE}` and review):\n" + "\n".join(diff[:60]))


def test_golden_file_is_what_the_writer_writes(golden, actual):
  # The committed file is byte-for-byte the writer's output (no hand edits).
  assert aot.dump_golden(actual) == GOLDEN.read_text(), f"regenerate with `{REGENERATE}`"


def test_diff_names_changed_paths(golden):
  changed = copy.deepcopy(golden)
  p = "llm/decoder/layers/layer/mlp/up_proj/kernel"
  changed["params"][p]["spec"] = [None, None, None]
  del changed["params"]["llm/lm_head/kernel"]
  changed["params"]["llm/extra/kernel"] = {"shape": [2], "dtype": "float32", "logical": [None],
                                           "spec": [None], "trainable": True}
  diff = "\n".join(aot.diff_specs(golden, changed))
  assert f"changed  {p} spec: [None, 'fsdp', 'tensor'] -> [None, None, None]" in diff
  assert "removed  llm/lm_head/kernel" in diff
  assert "added    llm/extra/kernel" in diff


def test_large_parameters_are_sharded(actual):
  """No accidental replication: every parameter > 1M elements is split on every reference mesh."""
  assert set(actual["meshes"]) == set(aot.GOLDEN_MESHES)
  for name, sizes in aot.GOLDEN_MESHES.items():
    replicated = []
    for path, p in actual["params"].items():
      n = math.prod(p["shape"])
      if n <= 1_000_000:
        continue
      split = math.prod(aot._axes_size(e, sizes) for e in p["spec"])
      if split == 1:
        replicated.append(f"{path} {p['shape']} {p['spec']}")
    assert not replicated, f"mesh {name}: large parameters replicated:\n" + "\n".join(replicated)
    assert actual["meshes"][name]["replicated_large"] == []
  # On the pure-FSDP reference mesh the big LLM matrices are split 128 ways.
  p = actual["params"]["llm/decoder/layers/layer/mlp/gate_proj/kernel"]
  assert p["shape"] == [28, 3584, 18944] and p["spec"] == [None, "fsdp", "tensor"]
  assert actual["meshes"]["fsdp128"]["param_bytes_per_device"] < 0.3 * 2 ** 30


def test_parameter_count_is_chatrex_7b(actual):
  """Independent count: Qwen2.5-7B (vocab 151769, untied) + CLIP-L/14-336 + ConvNeXt-L + projectors."""
  params = actual["params"]
  by_prefix = lambda prefix: sum(math.prod(p["shape"]) for k, p in params.items() if k.startswith(prefix))
  v, d, f, l, n, k, h = 151769, 3584, 18944, 28, 28, 4, 128
  layer = d * n * h + n * h + 2 * (d * k * h + k * h) + n * h * d + 3 * d * f + 2 * d
  assert by_prefix("llm/") == 2 * v * d + l * layer + d
  c, cf, cl, grid = 1024, 4096, 24, 336 // 14
  clip_layer = 4 * (c * c + c) + 2 * c * cf + cf + c + 4 * c
  clip = 14 * 14 * 3 * c + c + (grid * grid + 1) * c + 2 * c + cl * clip_layer + 2 * c
  assert by_prefix("vision_tower/") == clip
  assert 196_000_000 < by_prefix("vision_tower_aux/") < 200_000_000  # ConvNeXt-L: 196.2M + norms
  assert actual["num_params"] == sum(math.prod(p["shape"]) for p in params.values())


def test_stage2_trains_everything_but_the_convnext(actual):
  frozen = sorted(p for p, v in actual["params"].items() if not v["trainable"])
  assert frozen and all(p.startswith("vision_tower_aux/") for p in frozen)
  assert all(not v["trainable"] for p, v in actual["params"].items() if p.startswith("vision_tower_aux/"))


def test_only_small_or_still_sharded_dims_fall_back_to_replication(actual):
  """sharding.logical_shardings replicates dimensions their mesh axes do not divide. On the
  reference meshes that is the frozen ConvNeXt stem / stage 0 (192 channels vs fsdp=128) and
  the odd vocabulary (151769) vs tensor=4, whose matrices stay split over fsdp."""
  fsdp = actual["meshes"]["fsdp128"]["indivisible"]
  assert fsdp and all(p.startswith(("vision_tower_aux/stem_", "vision_tower_aux/stages_0/")) for p in fsdp)
  assert all(math.prod(actual["params"][p]["shape"]) < 1_000_000 for p in fsdp)
  assert actual["meshes"]["data2_fsdp16_tensor4"]["indivisible"] == [
      "llm/embed_tokens/embedding", "llm/lm_head/kernel"]
