"""Device meshes and shardings (data / fsdp / tensor axes), classic GSPMD (Auto axes)."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); -1 takes what is left."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("mesh: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices do not divide into {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are "
                         f"{len(devices)} devices")
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh, ndim: int = 1, batch_axis: int = 0) -> NamedSharding:
    """Shard one axis of an array over every data-parallel axis (data and fsdp)."""
    spec = [None] * ndim
    spec[batch_axis] = ("data", "fsdp")
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


# Logical parameter axes (see `models.logical_axes`) -> mesh axes. A dimension that the mesh
# axis does not divide stays replicated.
DEFAULT_RULES = {
    "vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
    "head_dim": None, "layers": None, "norm": None,
}


def param_shardings(shapes, logical, mesh: Mesh, rules: dict | None = None):
    """NamedShardings for a parameter tree from its shapes and logical axis names."""
    rules = {**DEFAULT_RULES, **(rules or {})}

    def one(shape, names):
        spec, used = [], set()
        for dim, name in zip(shape, names, strict=True):
            axis = rules.get(name)
            if axis is None or axis in used or dim % mesh.shape[axis]:
                spec.append(None)
            else:
                spec.append(axis)
                used.add(axis)
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(one, shapes, logical, is_leaf=lambda x: isinstance(x, tuple))
