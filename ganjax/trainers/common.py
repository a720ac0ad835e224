"""Pieces every trainer shares: config checks, metric writers, finiteness guard, tree norms.

Kept small on purpose: each trainer stays a readable linear loop and forks what it needs.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metric_writers

from ganjax.checkpoint import CheckpointShapeError

# ---- Config validation ---------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and what to change."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    require(value in choices, f"config.{key} = {value!r} is not one of {tuple(choices)}.")


def check_positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    bound = ">= 0" if allow_zero else "> 0"
    require(ok, f"config.{key} = {value!r} must be {bound}.")


# config.dtype: the compute dtype of the networks. Parameters and optimizer states stay float32 and
# losses are computed in float32 whatever it is; "bfloat16" is for GPU/TPU (XLA:CPU runs it no faster).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config) -> jnp.dtype:
    """The networks' compute dtype named by config.dtype (absent in older run configs: float32)."""
    name = config.get("dtype", "float32")
    check_choice("dtype", name, tuple(COMPUTE_DTYPES))
    return COMPUTE_DTYPES[name]


def check_batch_divisible(global_batch: int, data_parallel: int, process_count: int) -> None:
    require(
        global_batch % data_parallel == 0,
        f"config.train.batch_size = {global_batch} is not divisible by the mesh's data axis times its "
        f"fsdp axis ({data_parallel} devices share each batch); use a multiple of {data_parallel}.",
    )
    require(
        global_batch % process_count == 0,
        f"config.train.batch_size = {global_batch} is not divisible by the {process_count} processes.",
    )


# The config file each trainer ships (configs/ of a source checkout): its keys and value types are the
# trainer's schema. Variants of a file change values only, never keys.
SHIPPED_CONFIGS = {
    "aging": "aging_utkface.py",
    "pix2pix": "pix2pix_cityscapes.py",
    "cyclegan": "cyclegan_horse2zebra.py",
    "distill_pix2pix": "distill_pix2pix_cityscapes.py",
    "distill_cyclegan": "distill_cyclegan_horse2zebra.py",
    "age_regressor": "age_regressor.py",
}
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS_DIR = os.path.join(_REPO, "configs")


def check_config_keys(config, configs_dir: str = CONFIGS_DIR) -> None:
    """Raises ConfigError for a key that the trainer's shipped config does not have (a typo would
    otherwise be silently ignored) or a value of another type. Command-line overrides get this from
    ml_collections' locked config; this covers configs built in Python (`main.run`). Skipped when the
    shipped config file is not there (an installed package without configs/)."""
    name = SHIPPED_CONFIGS.get(config.get("trainer"))
    path = os.path.join(configs_dir, name) if name else ""
    if not path or not os.path.isfile(path):
        return
    schema = _flat_items(_load_config_file(path).get_config(""))
    given = _flat_items(config)
    for key, value in given.items():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f"; did you mean config.{close[0]}?" if close else "."
            raise ConfigError(
                f"config.{key} is not a setting of the {config.trainer!r} trainer (see configs/{name}){hint}"
            )
        expected = schema[key]
        if not _same_kind(expected, value):
            raise ConfigError(
                f"config.{key} = {value!r} is a {type(value).__name__}; configs/{name} has a "
                f"{type(expected).__name__} there ({expected!r})."
            )


@functools.cache
def _load_config_file(path: str):
    spec = importlib.util.spec_from_file_location(f"_shipped_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flat_items(config, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict | dict):
            out.update(_flat_items(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same_kind(expected: Any, value: Any) -> bool:
    """ml_collections' type rule (an int may stand for a float), with tuples and lists alike (JSON)."""
    if expected is None:
        return True  # no type to compare
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(expected, bool) and isinstance(value, bool)
    if isinstance(expected, float):
        return isinstance(value, int | float)
    for kind in (int, str):
        if isinstance(expected, kind):
            return isinstance(value, kind)
    if isinstance(expected, tuple | list):
        return isinstance(value, tuple | list)
    return True


def check_workdir_writable(workdir: str) -> str:
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        # One probe per process: the processes of a multi-host job share the workdir.
        probe = os.path.join(workdir, f".write_probe.{os.getpid()}.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir {workdir} is not writable: {e}") from e
    return workdir


# ---- Numerics ------------------------------------------------------------------------------------


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm became NaN/Inf; the run stops before writing a checkpoint."""


def first_nonfinite(history: Sequence[tuple[int, Mapping[str, float]]]) -> tuple[int, str] | None:
    """(step, metric name) of the first NaN/Inf value in host-side metric history, else None."""
    for step, metrics in history:
        for name, value in metrics.items():
            if not math.isfinite(float(value)):
                return step, name
    return None


def close_iterator(iterator) -> None:
    """Stops grain's worker processes (when it has any) before the interpreter exits."""
    close = getattr(iterator, "close", None)
    if callable(close):
        close()


class MetricHistory:
    """Per-step device metrics since the last log. They are fetched (one host sync) only when logging
    or before a checkpoint, and checked then: a NaN/Inf anywhere stops the run before the save."""

    def __init__(self):
        self._items: list[tuple[int, Any]] = []

    def append(self, step: int, metrics) -> None:
        self._items.append((step, metrics))

    def clear(self) -> None:
        self._items.clear()

    def fetch_checked(self, checkpointer) -> list[tuple[int, dict]]:
        """Host copies of the pending metrics; raises NonFiniteError naming the first bad one."""
        fetched = [(step, jax.device_get(m)) for step, m in self._items]
        bad = first_nonfinite(fetched)
        if bad is not None:
            bad_step, name = bad
            raise NonFiniteError(
                f"{name} became NaN/Inf at step {bad_step}; stopping without writing a checkpoint. "
                f"Last good checkpoint: step {checkpointer.latest_step()} in {checkpointer.directory}."
            )
        return fetched


def tree_norm(tree) -> jax.Array:
    """Global L2 norm of a pytree of arrays (float32 scalar)."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def ema_update(ema, new, decay: float):
    """Exponential moving average of parameters; decay 0 copies `new`."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, new)


# ---- Metric writers ------------------------------------------------------------------------------


class JsonlWriter(metric_writers.MetricWriter):
    """Appends every scalar write to `path` as one JSON object: {"step": s, name: value, ...}.

    Lets runs be compared with nothing but a JSON reader; other summary kinds are ignored.
    """

    def __init__(self, path: str):
        self._file = open(path, "a")  # noqa: SIM115 - closed in close()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        record = {"step": int(step)}
        record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        self._file.flush()

    def close(self):
        if not self._file.closed:
            self._file.close()


def read_metrics(workdir: str, *, merge: bool = True):
    """The scalars a run appended to WORKDIR/metrics.jsonl: {step: {name: value}} with every write of a
    step merged (merge=False: the records as written, in order, each with its "step")."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    if not merge:
        return records
    merged: dict[int, dict[str, float]] = {}
    for record in records:
        merged.setdefault(record.pop("step"), {}).update(record)
    return merged


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard + logging + metrics.jsonl on process 0; logging only on the other processes."""
    if jax.process_index() != 0:
        return metric_writers.create_default_writer(just_logging=True, asynchronous=False)
    default = metric_writers.create_default_writer(workdir, asynchronous=False)
    return metric_writers.MultiWriter([default, JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])


CONFIG_FILE = "config.json"


def save_run_config(workdir: str, config) -> None:
    """Writes the run's config to WORKDIR/config.json (process 0), so that tools that only get a workdir
    (translate, export, age) rebuild the same networks. Rewritten on every (re)start: a resumed run may
    change periodic settings, never shapes (the checkpoint restore checks those)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(path + ".tmp", path)  # never a half-written config.json


def load_run_config(workdir: str):
    """The ConfigDict a run saved with `save_run_config` (tuples come back as lists)."""
    path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: --workdir must be the workdir of a ganjax training run (it writes "
            f"{CONFIG_FILE} when it starts)."
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def flatten_config(config) -> dict[str, Any]:
    """ConfigDict -> {"a.b": scalar}; sequences become strings (TensorBoard hparams need scalars)."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if hasattr(value, "items"):
            for key, sub in value.items():
                visit(f"{prefix}.{key}" if prefix else key, sub)
        elif isinstance(value, bool | int | float | str):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    visit("", config)
    return flat


def mean_metrics(history: Iterable[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
    history = list(history)
    keys = history[0][1].keys()
    return {k: float(np.mean([m[k] for _, m in history])) for k in keys}


# ---- Learning-rate schedules ---------------------------------------------------------------------


def linear_decay_schedule(learning_rate: float, num_steps: int, decay_steps: int):
    """The reference's `--lr_policy linear` in steps: constant, then linear decay over `decay_steps`.

    The reference multiplies the rate in epoch k (0-based) by 1 - max(0, k + 1 - n_epochs) / (n_epochs_decay
    + 1); here k is the optimizer update count, n_epochs = num_steps - decay_steps and n_epochs_decay =
    decay_steps, so the last update still uses learning_rate / (decay_steps + 1), never 0. Returns an
    optax schedule (int count -> float32 rate).
    """
    constant = num_steps - decay_steps
    if decay_steps <= 0:
        return optax.constant_schedule(learning_rate)
    # Update `constant - 1` is the last at full rate; join_schedules feeds the decay `count - boundary`.
    return optax.join_schedules(
        [
            optax.constant_schedule(learning_rate),
            optax.linear_schedule(learning_rate, 0.0, transition_steps=decay_steps + 1),
        ],
        boundaries=[constant - 1],
    )


# ---- Loading parts of another run's state (init_from) ------------------------------------------


def resolve_checkpoint_step(path: str, key: str) -> str:
    """The `<step>/state` folder that an init_from path names.

    `path` may be a workdir (holding checkpoints/), its checkpoints/ folder (the latest complete step is
    used) or one step folder checkpoints/<step>. `key` names the config entry for error messages.
    """
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"config.{key} = {path!r} does not exist; point it at the --workdir of a finished run of the "
            "same trainer (or its checkpoints/ folder, or one checkpoints/<step> folder)."
        )
    if os.path.isdir(os.path.join(path, "state")):
        return os.path.join(path, "state")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    # Complete steps only: orbax writes "<step>.orbax-checkpoint-tmp-*" folders and renames them.
    steps = [
        int(d) for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d, "state"))
    ]
    if not steps:
        raise FileNotFoundError(
            f"config.{key} = {path!r} holds no complete checkpoint (no <step>/state folder); train that run "
            "first or name another one."
        )
    return os.path.join(path, str(max(steps)), "state")


def restore_subtrees(path: str, targets: Mapping[str, Any], key: str) -> dict[str, Any]:
    """Loads top-level fields of a saved train state, e.g. {"g_params": ..., "g_batch_stats": ...}.

    `path`: see `resolve_checkpoint_step`. `targets` maps each field to a pytree of arrays or
    `jax.ShapeDtypeStruct`s with shardings (the current state's); the restored arrays get the same
    structure, shapes and shardings. Everything else in the checkpoint (optimizer state, other networks)
    is not read. Raises FileNotFoundError for a missing path and `CheckpointShapeError` naming the first
    parameter that is missing or has another shape.
    """
    state_dir = resolve_checkpoint_step(path, key)
    saved = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
    wanted = {name: tree for name, tree in targets.items() if jax.tree.leaves(tree)}
    saved_leaves = dict(_named_leaves({name: saved.get(name, {}) for name in wanted}))
    for name, leaf in _named_leaves(wanted):
        if name not in saved_leaves:
            raise CheckpointShapeError(
                f"config.{key}: {state_dir} has no entry {name!r}; it was written by another trainer or a "
                "model with a different layout."
            )
        saved_shape = tuple(getattr(saved_leaves[name], "shape", ()) or ())
        if saved_shape != tuple(leaf.shape):
            raise CheckpointShapeError(
                f"config.{key}: {name!r} has shape {saved_shape} in {state_dir} but the config builds "
                f"{tuple(leaf.shape)}; use the same model settings as the run that wrote it."
            )
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), wanted)
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir,
        args=ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True,
        ),
    )
    return {name: restored[name] if name in wanted else tree for name, tree in targets.items()}


def _named_leaves(tree) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf) for path, leaf in leaves]
