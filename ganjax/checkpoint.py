"""Orbax checkpoints of a train state plus the grain data-iterator state.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`. `state` is the full train state pytree (every
network's parameters and optimizer state, the EMA generator, the step); `data` is the grain iterator
state as JSON, so that a resumed run reads exactly the batches an uninterrupted run would have read.

Resume order (documented here, applied by each trainer): the latest complete checkpoint in the
workdir > `init_from` paths named in the config > a fresh initialisation. Orbax writes each step to a
temporary directory (`<step>.orbax-checkpoint-tmp`) and renames it when complete, so a run killed
mid-save resumes from the previous complete step. A step folder is complete when it holds `state/_METADATA`
and `data/`; anything else (a killed save's temporary folder, a step folder missing its state) is never
listed, restored or counted towards `keep`, and `incomplete()` names it so that the trainer can report it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointShapeError(ValueError):
    """A checkpoint's parameter shapes do not match the model built from the config."""


_TMP_DIR = re.compile(r"^\d+\.orbax-checkpoint-tmp")


def incomplete_reason(step_dir: str) -> str | None:
    """Why the step folder `step_dir` cannot be restored, or None when it is complete."""
    if not os.path.isfile(os.path.join(step_dir, "state", "_METADATA")):
        return "it has no state/_METADATA (the train state was never completely written)"
    if not os.path.isdir(os.path.join(step_dir, "data")):
        return "it has no data/ (the data-iterator position is missing)"
    return None


class _CompleteStepsOnly:
    """orbax's standard `<step>` folder naming, listing only complete step folders.

    orbax itself lists every folder named by an integer; without this filter a step folder missing its
    state would become the "latest" checkpoint (and fail to restore) and count towards max_to_keep.
    """

    def __init__(self):
        self._standard = ocp.step.standard_name_format()

    def build_name(self, step: int) -> str:
        return self._standard.build_name(step)

    def find_all(self, base_path) -> Iterator[Any]:
        return (m for m in self._standard.find_all(base_path) if incomplete_reason(os.fspath(m.path)) is None)

    def find_step(self, base_path, step: int):
        metadata = self._standard.find_step(base_path, step)
        reason = incomplete_reason(os.fspath(metadata.path))
        if reason is not None:
            raise ValueError(f"Checkpoint {metadata.path} is incomplete: {reason}.")
        return metadata


class Checkpointer:
    """Saves and restores `(state, data_iterator_state)` pairs under `directory`.

    Saves are asynchronous: the device-to-host copy happens in `save`, the disk write in the
    background; `wait()` (or `close()`) blocks until it is on disk.
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            step_name_format=_CompleteStepsOnly(),
        )
        # Handlers named up front, so that metadata (shapes) can be read before a restore.
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def incomplete(self) -> list[tuple[str, str]]:
        """(path, reason) of every folder here that looks like a checkpoint but cannot be restored: the
        temporary folder of a save that never finished (a killed run, or a save still being written by
        another process) and step folders without their state or data. They are ignored."""
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if _TMP_DIR.match(name):
                found.append((path, "an unfinished save (orbax's temporary folder)"))
            elif name.isdigit() and os.path.isdir(path) and (reason := incomplete_reason(path)):
                found.append((path, reason))
        return found

    def set_aside(self, step_dir: str) -> str:
        """Renames an incomplete step folder to `<step>.incomplete[-n]` (kept for inspection), so that
        this step can be saved again; returns the new path."""
        target, n = f"{step_dir}.incomplete", 1
        while os.path.exists(target):
            target, n = f"{step_dir}.incomplete-{n}", n + 1
        os.rename(step_dir, target)
        return target

    def reached_preemption(self, step: int) -> bool:
        """True at the step where every process of a multi-process job saves after a preemption notice
        (JAX's preemption service, which owns SIGTERM there). All processes must call it at every step."""
        return jax.process_count() > 1 and self._manager.reached_preemption(step)

    def save(self, step: int, state: Any, data_state: dict | None) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state or {}),
            ),
            force=True,
        )

    def restore(self, step: int, target_state: Any) -> tuple[Any, dict]:
        """Restores `step` into the structure, shapes and shardings of `target_state`.

        `target_state` may be a concrete state or a tree of `jax.ShapeDtypeStruct`s with shardings.
        Raises `CheckpointShapeError` naming the first parameter whose shape differs.
        """
        abstract = jax.tree.map(_abstract_leaf, target_state)
        self._check_shapes(step, abstract)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, dict(restored.data or {})

    def _check_shapes(self, step: int, abstract: Any) -> None:
        metadata = self._manager.item_metadata(step)
        saved = metadata["state"] if metadata is not None else None
        if saved is None:
            return
        saved_leaves = dict(_flatten_with_names(saved))
        for name, leaf in _flatten_with_names(abstract):
            if name not in saved_leaves:
                raise CheckpointShapeError(
                    f"Checkpoint {self.directory}/{step} has no entry {name!r}: it was written by a "
                    "different model or trainer than the config describes."
                )
            saved_shape = tuple(getattr(saved_leaves[name], "shape", ()) or ())
            if saved_shape != tuple(leaf.shape):
                raise CheckpointShapeError(
                    f"Checkpoint {self.directory}/{step}: {name!r} has shape {saved_shape} but the "
                    f"config builds {tuple(leaf.shape)}. Use a fresh --workdir or the config the "
                    "checkpoint was trained with."
                )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _abstract_leaf(x):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def _flatten_with_names(tree) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf) for path, leaf in leaves]
