"""Device mesh, logical-axis sharding of whole states, sharded initialisation, batch placement.

The mesh has axes ``('data', 'fsdp', 'tensor')`` over all devices of all processes. Parameters carry
logical axis names (``model.py``); ``MeshConfig.rules`` maps them to mesh axes. State is created
directly into its sharding: ``jax.eval_shape`` gives the boxed abstract tree, the rules give one
``NamedSharding`` per leaf, and a ``jax.jit`` with those ``out_shardings`` materialises it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rlhf_jax.config import MeshConfig
from rlhf_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes


def mesh_shape(config: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve the (at most one) -1 entry of the mesh config against ``n_devices``."""
    sizes = list(config.shape)
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(
                f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes use {known} devices, which "
                f"does not divide the {n_devices} available devices"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
            f"but {n_devices} are available"
        )
    return tuple(sizes)


def data_parallel_size(config: MeshConfig, n_devices: int | None = None) -> int:
    """How many ways a batch is split: the product of the ``data`` and ``fsdp`` axes."""
    data, fsdp, _ = mesh_shape(config, jax.device_count() if n_devices is None else n_devices)
    return data * fsdp


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
    """One ``NamedSharding`` per leaf of a (boxed) abstract tree; unannotated leaves replicate.

    Raises a ValueError naming the leaf when a dimension does not divide its mesh axes.
    """
    specs = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract_tree))
    for (path, leaf), sharding in zip(leaves, jax.tree_util.tree_leaves(shardings)):
        _check_divisible(_path_name(path), leaf.shape, sharding.spec, mesh)
    return shardings


def _check_divisible(name: str, shape, spec: PartitionSpec, mesh: Mesh) -> None:
    for dim, (size, axes) in enumerate(zip(shape, spec)):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        n = math.prod(mesh.shape[a] for a in axes)
        if size % n:
            raise ConfigError(
                f"{name}: dimension {dim} has size {size}, which is not divisible by mesh axes "
                f"{axes} of total size {n} (mesh {dict(mesh.shape)})"
            )


class Sharded(NamedTuple):
    """A tree of arrays created in place, and its shardings (the same tree of ``NamedSharding``)."""

    tree: Any
    shardings: Any


def init_sharded(fn: Callable[[], Any], mesh: Mesh, rules) -> Sharded:
    """Run an init function (returning a boxed tree) straight into its shardings; the tree comes
    back unboxed (plain arrays)."""
    shardings = tree_shardings(jax.eval_shape(fn), mesh, rules)
    tree = jax.jit(lambda: nn.meta.unbox(fn()), out_shardings=shardings)()
    return Sharded(tree, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading dimension over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def process_rows(batch: Any) -> Any:
    """This process's rows of a global host batch: the ``i``-th of ``process_count`` equal slices
    along the leading axis (the whole batch on one process). Every process reading the same
    global batch and keeping its rows makes a batch the same whatever the number of processes."""
    n, i = jax.process_count(), jax.process_index()
    if n == 1:
        return batch

    def rows(x):
        x = np.asarray(x)
        if len(x) % n:
            raise ConfigError(f"a global batch of {len(x)} rows does not split over {n} processes")
        size = len(x) // n
        return x[i * size : (i + 1) * size]

    return jax.tree.map(rows, batch)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a tree of host-local numpy arrays as global arrays split over (data, fsdp).

    In a multi-process run every process passes its own slice of the global batch
    (``process_rows``), so the global leading dimension is ``local * process_count``.
    """
    n = math.prod(mesh.shape[a] for a in BATCH_AXES)

    def put(path, x):
        x = np.asarray(x)
        global_len = x.shape[0] * jax.process_count()
        if global_len % n:
            raise ConfigError(
                f"batch field {_path_name(path)!r}: global batch size {global_len} is not "
                f"divisible by the data-parallel mesh size {n} (data x fsdp)"
            )
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree_util.tree_map_with_path(put, batch)


def abstract_batch(host_batch: Any, mesh: Mesh) -> Any:
    """``ShapeDtypeStruct`` leaves of a host batch, split as ``shard_batch`` places it (dtypes as
    JAX converts them: float64 becomes float32): what a planned compile takes for the batch."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape,
            jax.dtypes.canonicalize_dtype(np.asarray(x).dtype),
            sharding=batch_sharding(mesh, np.ndim(x)),
        ),
        host_batch,
    )


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Multi-process start-up; on CPU the processes talk through gloo collectives."""
    # Must precede backend start-up; it only affects the CPU client.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
