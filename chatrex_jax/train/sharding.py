"""Device meshes and logical-axis sharding rules (pure FSDP by default).

Models annotate parameters and activations with logical axis names
(`chatrex_jax/models/__init__.py`); a rules table maps each to mesh axes. The mesh has the
axes ("data", "fsdp", "tensor"); a size of -1 takes the remaining devices.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from chatrex_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Pure FSDP: parameters sharded along their embed (or vocab) axis over `fsdp`, activations
# split over the batch on ("data", "fsdp"); `tensor` shards heads / mlp when its size > 1.
FSDP_RULES: tuple[tuple[str, object], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
)


def config_rules(config) -> list[tuple]:
  """The config's `logical_rules` (default FSDP_RULES) as (logical name, mesh axes) pairs."""
  return [tuple(r) for r in config.get("logical_rules", FSDP_RULES)]


class MeshError(UserError, ValueError):
  """`mesh` settings that do not fit the devices."""


def mesh_sizes(data: int, fsdp: int, tensor: int, num_devices: int) -> list[int]:
  """[data, fsdp, tensor] with the one -1 axis resolved for `num_devices`."""
  sizes = [int(data), int(fsdp), int(tensor)]
  fix = "set mesh.data / mesh.fsdp / mesh.tensor (--config.mesh.KEY=N) to a split of the devices"
  if sizes.count(-1) > 1:
    raise MeshError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}; {fix}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise MeshError(f"{num_devices} devices cannot be split into {sizes}; {fix}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                    f"{num_devices} available; {fix}")
  return sizes


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_sizes(data, fsdp, tensor, len(devices))
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_shardings(abstract_tree, mesh: Mesh, rules=FSDP_RULES):
  """NamedShardings for a boxed (logically partitioned) tree, e.g. from `jax.eval_shape(init)`.

  A dimension whose size the mapped mesh axes do not divide (a 603-token vocabulary on a
  2-way tensor axis) is replicated instead of failing; big models have divisible sizes.
  """
  specs = nn.get_partition_spec(abstract_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, list(rules))
  shapes = nn.unbox(abstract_tree)

  def fit(sharding, leaf):
    if not isinstance(sharding, NamedSharding):
      return sharding
    dims = []
    for size, axes in zip(leaf.shape, tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
      dims.append(axes if size % ways == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*dims))
  return jax.tree.map(fit, shardings, shapes, is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves (arrays or shapes) carrying `shardings` (same tree)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
