"""Device meshes and shardings (data / fsdp / tensor axes), classic GSPMD (Auto axes), and the
multi-controller plumbing: start-up, host rows <-> global arrays, small cross-process reductions.

Multi-process convention: devices are ordered process by process, so along a batch axis split
over (data, fsdp) process p holds one contiguous block of rows, rows [p*L, (p+1)*L).
"""

from __future__ import annotations

import json
import logging
import math
import os
import urllib.request
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from catjax import hostinfo

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both (data parallel and FSDP)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); -1 takes what is left."""
    # Process-major (stable) order: each process's batch rows are one contiguous block.
    devices = list(devices if devices is not None else
                   sorted(jax.devices(), key=lambda d: d.process_index))
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
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, PartitionSpec(*spec))


def keep_rows_split(x: jax.Array, mesh: Mesh | None, axis: int = 0,
                    heads_axis: int | None = None) -> jax.Array:
    """Inside jit: keep `x`'s `axis` split over the mesh's data-parallel axes (no mesh: `x`).
    `heads_axis` (a KV cache's kv heads, where `x` has it): split over the tensor axis, as the
    weights that make them are, when it divides them; otherwise a cache was whole on every
    chip of the tensor axis (Qwen 3 4B sampler, tensor=4: 9.43 GiB per chip)."""
    if mesh is None:
        return x
    spec = [None] * x.ndim
    spec[axis] = BATCH_AXES
    if (heads_axis is not None and heads_axis < x.ndim and mesh.shape["tensor"] > 1
            and x.shape[heads_axis] % mesh.shape["tensor"] == 0):
        spec[heads_axis] = "tensor"
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def rows_and_vocab_split(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Inside jit: logits [R, V] as the head makes them on a mesh with a tensor axis (the
    vocabulary split over it, the rows over the data-parallel axes). Pinned so, a later
    constraint to whole rows gathers the logits (a few MB) rather than the head: a sampler
    left to GSPMD gathered the whole head over the tensor axis every step (Qwen 3 4B, tensor=2:
    778 MB a step). Without a tensor axis: `x`."""
    if mesh is None or mesh.shape["tensor"] == 1:
        return x
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, PartitionSpec(BATCH_AXES, *[None] * (x.ndim - 2), "tensor")))


def split_features(x: jax.Array, mesh: Mesh | None, row_axis: int = 0,
                   feature_axis: int = -1) -> jax.Array:
    """Inside jit: a decode step's hidden states ([B, T, D]; [R, D] or [D, R]) on a mesh with
    an fsdp axis: the rows split over the data axis only, the features over fsdp, as the
    weights' D is. Every matmul then multiplies the shards it holds and sums a few rows'
    partial results, and the weights stay put; left to GSPMD, each step gathered most of the
    weights (Qwen 3 4B on a v5p, fsdp=4: gate, up and q/k/v of every layer, every step,
    bench/RESULTS.md). Without an fsdp axis: `x`."""
    if mesh is None or mesh.shape["fsdp"] == 1:
        return x
    spec = [None] * x.ndim
    spec[row_axis], spec[feature_axis] = "data", "fsdp"
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def per_device_rows(fn, mesh: Mesh | None, in_axes: Sequence[int | None], out_axis: int = 0):
    """`fn` run by each device on its own rows (`jax.shard_map` over the data-parallel axes):
    argument i is split on axis `in_axes[i]` (None: the same on every device), the result (a
    tree) on `out_axis`. GSPMD does not always see that an op keeps rows in place (a scatter
    whose row indices are an iota, `lax.top_k`) and would send every row to every device.
    Without a mesh, or with one data-parallel device: `fn` itself."""
    if mesh is None or data_parallel_size(mesh) == 1:
        return fn

    def spec(axis: int | None) -> PartitionSpec:
        return PartitionSpec() if axis is None else PartitionSpec(*[None] * axis, BATCH_AXES)

    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(a) for a in in_axes),
                         out_specs=spec(out_axis), axis_names=set(BATCH_AXES), check_vma=False)


def put_rows(x: np.ndarray, mesh: Mesh | None, collective: bool = False) -> jax.Array:
    """Host rows onto the device(s): split over `mesh`'s data-parallel axes (`collective`:
    this process's block of a multi-process global array, `host_to_global`), else one device."""
    if mesh is None:
        return jnp.asarray(x)
    sharding = batch_sharding(mesh, np.ndim(x))
    return host_to_global(x, sharding) if collective else jax.device_put(x, sharding)


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


def gathered_over_fsdp(tree: Any, logical: Any, mesh: Mesh | None, rules: dict | None = None,
                       from_shards: bool = True):
    """Inside jit: the parameters `tree` (logical axis names `logical`, as `param_shardings`)
    constrained to their shardings with the fsdp axis left out, i.e. all-gathered over it; their
    gradients come back reduce-scattered. The forward passes over whole sequences (training,
    scoring, prefill) call it per layer, and keep the rows split: left to itself, GSPMD kept
    the weights sharded and moved every row's activations instead (Qwen 3 4B update on a v5p
    with fsdp=4: all-reduces of [rows, 2048, 9728] in every layer, bench/RESULTS.md). No mesh,
    or an fsdp axis of 1: `tree` itself. `from_shards=False`: `tree` was gathered already
    (a loop's copy of weights gathered before it), keep it so."""
    if mesh is None or mesh.shape["fsdp"] == 1:
        return tree
    rules = {**DEFAULT_RULES, **(rules or {})}
    shapes = jax.tree.map(lambda a: a.shape, tree)
    # First at their own sharding: the gradient then reaches it as a reduce-scatter, not as an
    # all-reduce of the whole gradient on every device (twice the traffic).
    if from_shards:
        tree = jax.tree.map(jax.lax.with_sharding_constraint, tree,
                            param_shardings(shapes, logical, mesh, rules))
    gathered = {k: (None if v == "fsdp" else v) for k, v in rules.items()}
    return jax.tree.map(jax.lax.with_sharding_constraint, tree,
                        param_shardings(shapes, logical, mesh, gathered))


# --- multi-controller start-up ---------------------------------------------------------------

def _tpu_worker_count() -> int:
    """Hosts of this Cloud TPU slice (1 if not on a TPU VM); never initializes a JAX backend."""
    if not hostinfo.tpu_present():
        return 1
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES")
    if hosts:  # GKE (JobSet) and some queued-resource setups
        return len([h for h in hosts.split(",") if h.strip()])
    if os.environ.get("TPU_SKIP_MDS_QUERY") is not None:  # no metadata server to ask
        return 1
    req = urllib.request.Request(
        "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
        "worker-network-endpoints", headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return max(1, len([w for w in r.read().decode().split(",") if w.strip()]))
    except OSError:  # not a GCE TPU VM (or no metadata): single host
        return 1


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Join a multi-controller run; call before any JAX computation. Returns whether it did.

    Explicit arguments (any cluster, also several processes on one machine) are passed to
    `jax.distributed.initialize`. With none: a multi-host Cloud TPU slice (several workers in
    TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES or the VM's metadata, or a multislice
    MEGASCALE_COORDINATOR_ADDRESS) lets JAX detect everything; otherwise it stays one process.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = (coordinator_address, num_processes, process_id)
    if any(a is not None for a in explicit):
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif os.environ.get("MEGASCALE_COORDINATOR_ADDRESS") or _tpu_worker_count() > 1:
        jax.distributed.initialize()
    else:
        return False
    log.info("jax.distributed: process %d of %d, %d local / %d devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


# --- host data <-> global arrays -------------------------------------------------------------

def is_global(tree: Any) -> bool:
    """Whether any array of `tree` spans devices of other processes."""
    return any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(tree))


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh of the first leaf with a NamedSharding (e.g. the trainer's parameters)."""
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def process_rows(sharding: jax.sharding.Sharding, global_rows: int) -> tuple[int, int]:
    """[lo, hi): the rows (axis 0) of a global array this process holds; must be one block."""
    spans = sorted({idx[0].indices(global_rows)[:2]
                    for idx in sharding.addressable_devices_indices_map((global_rows,)).values()})
    lo, hi = spans[0][0], spans[0][1]
    for a, b in spans[1:]:
        if a > hi:
            raise ValueError(f"this process's rows {spans} are not one block: order the mesh's "
                             "devices process by process (parallel.make_mesh does)")
        hi = max(hi, b)
    return lo, hi


def host_to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows -> a global array split on axis 0 (rows of process p at p*len(x)).

    One process: a plain `device_put`. Every process must pass the same number of rows.
    """
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
    lo, hi = process_rows(sharding, global_shape[0])
    if (lo, hi) != (jax.process_index() * x.shape[0], (jax.process_index() + 1) * x.shape[0]):
        raise ValueError(f"process {jax.process_index()} holds rows [{lo}, {hi}) of "
                         f"{global_shape[0]}, not its block of {x.shape[0]}: the batch axis must be "
                         "split evenly over processes (no tensor axis across hosts)")
    return jax.make_array_from_process_local_data(sharding, x, global_shape)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's block of rows, [p*L, (p+1)*L) with L = rows / processes, as host numpy,
    read from its own shards of a global array split on axis 0 (see `host_to_global`)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    block = x.shape[0] // jax.process_count()
    lo = jax.process_index() * block
    shards = {}
    for s in x.addressable_shards:  # replicas (e.g. over a tensor axis) hold the same rows
        if s.data.shape[1:] == x.shape[1:]:
            shards.setdefault(s.index[0].indices(x.shape[0])[:2], s)
    spans = sorted(shards)
    if ([a for a, _ in spans[:1]] + [b for _, b in spans[-1:]] != [lo, lo + block]
            or any(b != a for (_, b), (a, _) in zip(spans, spans[1:], strict=False))):
        raise ValueError(f"local_rows: process {jax.process_index()} holds rows {spans}, not its "
                         f"block [{lo}, {lo + block}) whole: shard the array by rows first")
    return np.concatenate([np.asarray(shards[k].data) for k in spans], 0)


def to_host(tree: Any) -> Any:
    """Whole arrays on every process's host (a collective when any leaf is global)."""
    if not is_global(tree):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


# --- small cross-process agreements ----------------------------------------------------------

def process_max(values: Sequence[int]) -> list[int]:
    """Element-wise max of small int vectors over processes (identity for one process)."""
    if jax.process_count() == 1:
        return [int(v) for v in values]
    from jax.experimental import multihost_utils

    got = multihost_utils.process_allgather(np.asarray(values, np.int32))
    return [int(v) for v in np.asarray(got).reshape(jax.process_count(), -1).max(0)]


def process_any(flag: bool) -> bool:
    """Whether `flag` holds on any process (a collective when there are several)."""
    return process_max([int(bool(flag))])[0] > 0


def allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able `obj`, in process order (two small collectives)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    size = process_max([blob.size])[0]
    buf = np.zeros(size + 4, np.uint8)  # 4 bytes of length, then the text
    buf[:4] = np.frombuffer(np.uint32(blob.size).tobytes(), np.uint8)
    buf[4:4 + blob.size] = blob
    got = np.asarray(multihost_utils.process_allgather(buf)).reshape(jax.process_count(), -1)
    return [json.loads(row[4:4 + int(row[:4].view(np.uint32)[0])].tobytes()) for row in got]
