"""Device mesh and shardings, built from `config.mesh`.

Sharding is data: the config names the mesh axes and their sizes (`-1` = all remaining devices), this
module turns them into a `jax.sharding.Mesh` and `NamedSharding`s. Batches are split over the `data`
axis; parameters and optimizer state are replicated by default.
"""

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def mesh_shape(axes: Sequence[tuple[str, int]], num_devices: int) -> dict[str, int]:
    """Resolves axis sizes (one may be -1) against the device count; raises a clear error if impossible."""
    names = [name for name, _ in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"config.mesh.axes has repeated axis names: {names}")
    if DATA_AXIS not in names:
        raise ValueError(f"config.mesh.axes must contain a {DATA_AXIS!r} axis, got {names}")
    sizes = [int(size) for _, size in axes]
    if sum(size == -1 for size in sizes) > 1:
        raise ValueError(f"config.mesh.axes: at most one axis may have size -1, got {list(axes)}")
    if any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"config.mesh.axes: sizes must be positive or -1, got {list(axes)}")
    fixed = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(
                f"config.mesh.axes {list(axes)}: the fixed axis sizes multiply to {fixed}, which does "
                f"not divide the {num_devices} available devices."
            )
        sizes = [num_devices // fixed if size == -1 else size for size in sizes]
    elif fixed > num_devices:
        raise ValueError(
            f"config.mesh.axes {list(axes)} needs {fixed} devices but only {num_devices} are "
            "available; lower the sizes or set one axis size to -1 to use all devices."
        )
    return dict(zip(names, sizes, strict=True))


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with classic (Auto) axis types, so jit with explicit shardings behaves like pjit."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(axes, len(devices))
    # Fixed sizes smaller than the device count use the first devices (debugging on part of a host).
    used = math.prod(shape.values())
    device_grid = np.asarray(devices[:used]).reshape(tuple(shape.values()))
    return Mesh(device_grid, tuple(shape), axis_types=(AxisType.Auto,) * len(shape))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`; all other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_batch(batch, mesh: Mesh):
    """Turns this process's numpy batch (local slice of the global batch) into global jax Arrays."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def put_replicated_batch(batch, mesh: Mesh):
    """Global arrays from a batch that every process holds in full (e.g. the eval set)."""
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, batch)
