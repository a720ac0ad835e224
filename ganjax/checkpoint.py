"""Orbax checkpoints of a train state plus the grain data-iterator state.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`. `state` is the full train state pytree (every
network's parameters and optimizer state, the EMA generator, the step); `data` is the grain iterator
state as JSON, so that a resumed run reads exactly the batches an uninterrupted run would have read.

Resume order (documented here, applied by each trainer): the latest complete checkpoint in the
workdir > `init_from` paths named in the config > a fresh initialisation. Orbax writes each step to a
temporary directory and renames it when complete, so a run killed mid-save resumes from the previous
complete step.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointShapeError(ValueError):
    """A checkpoint's parameter shapes do not match the model built from the config."""


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
        return list(self._manager.all_steps())

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
