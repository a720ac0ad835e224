"""Device mesh, partitioning rules and the multi-process runtime, built from `config.mesh` and the flags.

Mesh. `config.mesh.axes` names the axes and their sizes, one of them may be -1 ("all remaining
devices"): `(("data", -1), ("fsdp", 1))`. Only two axis names exist:
  data  pure data parallelism: every device along it holds the same parameters
  fsdp  fully sharded data parallelism: the batch is split over it too, and parameters and optimizer
        state may be split over it (each device stores 1/fsdp of a sharded array; XLA all-gathers it
        for the forward pass and reduce-scatters its gradient)
A batch's leading axis is split over data x fsdp jointly, so the global batch must be a multiple of
data * fsdp; with fsdp = 1 this is plain data parallelism. A mesh always spans every device of a
multi-process job (each process feeds its own devices); on one process a mesh smaller than the device
count uses the first devices (debugging).

Partitioning rules (`config.mesh.rules`): a sequence of `(regex, how)` tried in order against each
state leaf's path, e.g. "g_params/ResnetBlock_0/Conv_0/kernel" or
"g_opt_state/0/mu/ResnetBlock_0/Conv_0/kernel" (`re.search`, first match wins, no match = replicated).
`how` is
  "fsdp"         split the largest axis divisible by the fsdp size over `fsdp` (ties: the last such
                 axis, the output features of a kernel); arrays with fewer than
                 `config.mesh.min_shard_size` elements stay replicated (their all-gather costs more
                 than it saves)
  "replicate"    a full copy on every device (None means the same)
  a tuple        an explicit PartitionSpec, one entry per leading array axis: None, an axis name or a
                 tuple of names, e.g. (None, None, None, "fsdp")
A sharding whose axis does not divide the array falls back to replication, with a logged note. The
choice depends only on the path's match and the shape, so a rule that matches the end of a path
(r"Conv_0/kernel$", not r"^g_params/...") gives Adam's mu and nu (and an EMA copy) exactly the sharding
of their parameter. A mesh without an fsdp axis (or fsdp = 1) replicates everything.

Multi-process runtime. `initialize_distributed(mode)` (the --distributed flag) calls
`jax.distributed.initialize` on TPU VMs, under SLURM / Open MPI with more than one task, or when
JAX_COORDINATOR_ADDRESS is set; never on a plain single host. Each process then reads its own shard of
the data (B_local = B / process_count examples per step, the grain pipelines' process_index shard) and
`shard_batch` assembles the global (B, ...) arrays from the processes' (B_local, ...) numpy batches.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # a batch's leading axis is split over both, in this order
DEFAULT_MIN_SHARD_SIZE = 2**16  # elements; used when config.mesh has no min_shard_size

# ---- Mesh --------------------------------------------------------------------------------------


def mesh_shape(axes: Sequence[tuple[str, int]], num_devices: int) -> dict[str, int]:
    """Resolves axis sizes (one may be -1) against the device count; raises a clear error if impossible."""
    names = [name for name, _ in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"config.mesh.axes has repeated axis names: {names}")
    if DATA_AXIS not in names:
        raise ValueError(f"config.mesh.axes must contain a {DATA_AXIS!r} axis, got {names}")
    unknown = [name for name in names if name not in BATCH_AXES]
    if unknown:
        raise ValueError(f"config.mesh.axes: unknown axis names {unknown}; the axes are {BATCH_AXES}.")
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
    """A mesh with classic (Auto) axis types, so jit with explicit shardings behaves like pjit.

    A mesh over all devices lets `jax.make_mesh` order them by the physical topology (TPU ICI rings);
    on CPU and GPU that is `jax.devices()` order, process by process.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(axes, len(devices))
    used = math.prod(shape.values())
    axis_types = (AxisType.Auto,) * len(shape)
    if used == len(devices):
        return jax.make_mesh(tuple(shape.values()), tuple(shape), axis_types, devices=devices)
    if jax.process_count() > 1:
        # A process without devices in the mesh could not feed its data shard.
        raise ValueError(
            f"config.mesh.axes {list(axes)} uses {used} of the {len(devices)} devices of this "
            f"{jax.process_count()}-process job; a multi-process mesh must use all of them (set one size "
            "to -1)."
        )
    # Fixed sizes smaller than the device count use the first devices (debugging on part of a host).
    device_grid = np.asarray(devices[:used]).reshape(tuple(shape.values()))
    return Mesh(device_grid, tuple(shape), axis_types=axis_types)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch's leading axis is split over: data, then fsdp when the mesh has it."""
    return tuple(name for name in BATCH_AXES if name in mesh.shape)


def data_parallel_size(mesh: Mesh) -> int:
    """Devices a batch is split over (data x fsdp): the global batch must be a multiple of it."""
    return math.prod(mesh.shape[name] for name in batch_axes(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp; all other axes replicated."""
    axes = batch_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(axes[0] if len(axes) == 1 else axes))


# ---- Batches -------------------------------------------------------------------------------------


def shard_batch(batch, mesh: Mesh):
    """Global jax Arrays (B, ...) from this process's numpy batch (B / process_count, ...).

    Each process passes its own slice of the global batch (its data shard); its rows go to the devices
    it owns. With one process this is a plain split of the batch over the devices.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def put_replicated_batch(batch, mesh: Mesh):
    """Global arrays from a batch that every process holds in full (e.g. the eval set)."""
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, batch)


def to_host(tree):
    """numpy copies of (possibly batch-sharded) global arrays, the same full values on every process.

    With several processes a batch-sharded output has rows on other hosts: those are all-gathered, so
    every process must call this (it is a collective then).
    """

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


# ---- Partitioning rules --------------------------------------------------------------------------

# What a rule asks for (its second entry); "fsdp" is also the axis name, FSDP_AXIS.
FSDP = "fsdp"
REPLICATE = "replicate"


def _parse_rules(rules) -> list[tuple[re.Pattern, Any]]:
    """[(compiled regex, "fsdp" | "replicate" | PartitionSpec entries)]; raises naming a bad rule."""
    parsed = []
    for rule in rules or ():
        if not isinstance(rule, Sequence) or isinstance(rule, str) or len(rule) != 2:
            raise ValueError(f"config.mesh.rules: each rule is a (regex, how) pair, got {rule!r}")
        pattern, how = rule
        try:
            regex = re.compile(str(pattern))
        except re.error as e:
            raise ValueError(f"config.mesh.rules: bad regex {pattern!r}: {e}") from e
        if how is None:
            how = REPLICATE
        if isinstance(how, str):
            if how not in (FSDP, REPLICATE):
                raise ValueError(
                    f"config.mesh.rules: {how!r} (rule {pattern!r}) is not 'fsdp', 'replicate' or a tuple "
                    "of per-axis mesh axis names (a PartitionSpec)."
                )
        elif isinstance(how, Sequence):  # lists come back from config.json
            how = tuple(tuple(e) if isinstance(e, list) else e for e in how)
        else:
            raise ValueError(f"config.mesh.rules: {how!r} (rule {pattern!r}) is not a valid sharding.")
        parsed.append((regex, how))
    return parsed


def _largest_divisible_axis_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec | None:
    """`fsdp` on the largest axis of `shape` that it divides (ties: the last); None if none does."""
    candidates = [i for i, n in enumerate(shape) if n % fsdp == 0]
    if not candidates:
        return None
    axis = max(candidates, key=lambda i: (shape[i], i))
    return PartitionSpec(*[FSDP_AXIS if i == axis else None for i in range(len(shape))])


def _explicit_spec(entries: tuple, shape: tuple[int, ...], mesh: Mesh) -> tuple[PartitionSpec | None, str]:
    """The PartitionSpec `entries` names, without axes the mesh lacks; (None, why) if it cannot apply."""
    if len(entries) > len(shape):
        return None, f"spec {entries} has more entries than the array has axes {shape}"
    spec = []
    for size, entry in zip(shape, entries, strict=False):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        names = tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1)
        ways = math.prod(mesh.shape[n] for n in names)
        if size % ways:
            return None, f"axis of size {size} is not divisible by {'x'.join(names)} = {ways}"
        spec.append(None if not names else names[0] if len(names) == 1 else names)
    while spec and spec[-1] is None:  # canonical form: P(None, "fsdp", None) == P(None, "fsdp")
        spec.pop()
    return PartitionSpec(*spec), ""


def partition_specs(abstract_state, mesh: Mesh, rules=(), *, min_size: int = DEFAULT_MIN_SHARD_SIZE):
    """A PartitionSpec per leaf of `abstract_state` (arrays or ShapeDtypeStructs), and notes.

    Returns (specs pytree, notes): notes lists "path: why" for each leaf a rule wanted sharded but that
    stays replicated because no axis divides.
    """
    parsed = _parse_rules(rules)
    fsdp = mesh.shape.get(FSDP_AXIS, 1)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    specs, notes = [], []
    for key_path, leaf in leaves:
        path = jax.tree_util.keystr(key_path, simple=True, separator="/")
        shape = tuple(getattr(leaf, "shape", ()))
        how = next((how for regex, how in parsed if regex.search(path)), REPLICATE)
        spec = PartitionSpec()
        if how == FSDP:
            if fsdp > 1 and shape and math.prod(shape) >= min_size:
                auto = _largest_divisible_axis_spec(shape, fsdp)
                if auto is None:
                    notes.append(f"{path}: no axis of {shape} is divisible by fsdp = {fsdp}")
                else:
                    spec = auto
        elif how != REPLICATE:
            explicit, why = _explicit_spec(how, shape, mesh)
            if explicit is None:
                notes.append(f"{path}: {why}")
            else:
                spec = explicit
        specs.append(spec)
    return jax.tree_util.tree_unflatten(treedef, specs), notes


def state_shardings(abstract_state, mesh: Mesh, mesh_config: Mapping | None = None):
    """NamedShardings for a train state from `config.mesh` (its `rules` and `min_shard_size`).

    `abstract_state`: the state or `jax.eval_shape` of its init. Without rules (or with fsdp = 1)
    every leaf is replicated. Logs how much of the state is sharded and each leaf that fell back to
    replication.
    """
    mesh_config = mesh_config or {}
    rules = mesh_config.get("rules", ()) or ()
    min_size = int(mesh_config.get("min_shard_size", DEFAULT_MIN_SHARD_SIZE))
    specs, notes = partition_specs(abstract_state, mesh, rules, min_size=min_size)
    _log_partitioning(abstract_state, specs, mesh, notes)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def _itemsize(dtype) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # PRNG key arrays: a uint32 pair per key
        return 8


def _log_partitioning(abstract_state, specs, mesh: Mesh, notes: list[str]) -> None:
    leaves = jax.tree.leaves(abstract_state)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    total = per_device = 0
    sharded = 0
    for leaf, spec in zip(leaves, spec_leaves, strict=True):
        nbytes = math.prod(getattr(leaf, "shape", ())) * _itemsize(leaf.dtype)
        ways = math.prod(mesh.shape[n] for e in spec if e for n in ((e,) if isinstance(e, str) else e))
        total += nbytes
        per_device += nbytes // ways
        sharded += ways > 1
    if sharded or notes:
        logging.info(
            "State partitioning on mesh %s: %d of %d arrays sharded; %.1f MiB per device, %.1f MiB in all.",
            dict(mesh.shape),
            sharded,
            len(leaves),
            per_device / 2**20,
            total / 2**20,
        )
    if notes:
        shown = "; ".join(notes[:20]) + (f"; ... {len(notes) - 20} more" if len(notes) > 20 else "")
        logging.info("Kept replicated although a rule asked to shard them (%d): %s", len(notes), shown)


# ---- Multi-process runtime -----------------------------------------------------------------------

DISTRIBUTED_MODES = ("auto", "on", "off")


def detect_cluster(environ: Mapping[str, str] | None = None, *, tpu_chips: bool | None = None) -> str | None:
    """Why this process belongs to a multi-process job (a short reason), or None on a plain host.

    Checked from the environment only (no network): an explicit JAX_COORDINATOR_ADDRESS, SLURM or
    Open MPI with more than one task, or a Cloud TPU VM (libtpu and TPU chips, or the GKE worker list);
    JAX's own cluster detection then fills in the coordinator, process count and id.
    `environ` / `tpu_chips`: the environment and whether TPU chips are present (default: probe).
    """
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS is set"
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return f"SLURM step with {env['SLURM_NTASKS']} tasks"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return f"Open MPI job with {env['OMPI_COMM_WORLD_SIZE']} ranks"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if "," in hosts:
        return "TPU worker list in the environment"
    if _has_tpu_chips() if tpu_chips is None else tpu_chips:
        return "Cloud TPU VM"
    return None


def _has_tpu_chips() -> bool:
    """JAX's own verdict, made when it was imported: libtpu is installed and TPU chips are on the PCI
    bus (Google's vendor id alone would also match a gVNIC network card)."""
    try:
        from jax._src import cloud_tpu_init  # private, but it is the check JAX itself relies on
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def initialize_distributed(
    mode: str = "auto", environ: Mapping[str, str] | None = None, *, tpu_chips: bool | None = None
) -> bool:
    """Connects this process to the others of its job; returns whether it did.

    mode "off": never. "on": always (fails if the coordinator cannot be found). "auto": when
    `detect_cluster` finds a multi-process job. Must run before anything touches a JAX backend.
    The coordinator, process count and id come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID when set (launch/local.sh, launch/gpu_slurm.sh), else from JAX's cluster detection
    (TPU metadata, SLURM, Open MPI).
    """
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"--distributed={mode!r} is not one of {DISTRIBUTED_MODES}.")
    env = os.environ if environ is None else environ
    reason = {"auto": lambda: detect_cluster(env, tpu_chips=tpu_chips), "on": lambda: "--distributed=on"}
    reason = reason.get(mode, lambda: None)()
    if reason is None:
        return False
    kwargs = {}
    if env.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    logging.info("Initialising the JAX distributed runtime (%s).", reason)
    jax.distributed.initialize(**kwargs)
    logging.info(
        "Process %d of %d: %d local devices of %d.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def sync(name: str) -> None:
    """A barrier: returns on every process once all have reached it (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
