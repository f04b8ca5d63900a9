"""Device mesh, logical axis rules and the shardings that follow from them (DESIGN.md §4)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert")
BATCH_AXES = ("data", "fsdp", "expert")  # the batch is split over every device

# Logical parameter / activation axis -> mesh axis. Names not listed stay unsharded.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("experts", "expert"),
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """Sizes of ('data', 'fsdp', 'expert'); one of them may be -1 (= the rest)."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} are invalid: use positive "
                         "sizes and at most one -1 (= the devices left over).")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the "
                             f"{num_devices} devices; change config.mesh.")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} multiply to "
                         f"{math.prod(sizes)} but there are {num_devices} devices; change "
                         "config.mesh (one size may be -1).")
    return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_shardings(boxed_tree, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes.

    The result has the structure of the *unboxed* tree; unnamed leaves are replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)
