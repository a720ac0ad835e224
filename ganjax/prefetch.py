"""Device prefetch for the train loop: batch t+1 is sharded onto the devices while step t runs.

    batches = prefetch_to_device(train_iter, mesh, size=2)
    for ...:
        state, metrics = step_fn(state, next(batches))   # already global jax Arrays
        ...
        ckpt.save(step, state, batches.get_state())       # the data position of the *next* step

jax dispatches steps asynchronously, so the host returns from `step_fn` at once; `next(batches)` then
reads, decodes and transfers the following batches (`sharding.shard_batch`: the same global arrays the
loop builds today) while the devices compute. Keeping `size` batches on the devices (the one in use and
size - 1 ahead) hides a slow transfer (host -> GPU/TPU) or an uneven data pipeline behind the step.

Checkpoints stay exact: the wrapped iterator has already produced the prefetched batches, so its own
`get_state()` is up to `size` batches ahead. `get_state()` here returns the state the iterator had
before the oldest batch not yet handed out, which is what a resumed run must read next (on a
multi-process mesh every process calls it at the same step, as with the bare iterator); `set_state()`
drops the prefetched batches and repositions the iterator.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

from jax.sharding import Mesh

from ganjax import sharding


class DevicePrefetcher:
    """An iterator of sharded batches: when it hands out batch t, batches t+1 .. t+size-1 are already on
    their way to the devices; see the module docstring.

    `iterator` yields this process's numpy batches (pytrees) and, for checkpointing, has grain's
    `get_state()` / `set_state()`; `close()` closes it (grain's worker processes).
    """

    def __init__(self, iterator, mesh: Mesh, size: int = 2):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._iterator = iterator
        self._mesh = mesh
        self._size = size
        # (state of the iterator before the batch, the sharded batch), oldest first.
        self._queue: collections.deque[tuple[Any, Any]] = collections.deque()

    def __iter__(self) -> Iterator:
        return self

    def _fill(self) -> None:
        while len(self._queue) < self._size:
            state = self._iterator.get_state()
            try:
                host_batch = next(self._iterator)
            except StopIteration:
                return
            self._queue.append((state, sharding.shard_batch(host_batch, self._mesh)))

    def __next__(self):
        # Filling before handing out batch t starts the transfer of t+1 .. t+size-1 before the caller
        # dispatches step t, and their host-side reading overlaps step t-1, still running.
        self._fill()
        if not self._queue:
            raise StopIteration
        return self._queue.popleft()[1]

    def get_state(self):
        """The wrapped iterator's state for the next batch `__next__` will return."""
        if self._queue:
            return self._queue[0][0]
        return self._iterator.get_state()

    def set_state(self, state) -> None:
        self._queue.clear()
        self._iterator.set_state(state)

    def close(self) -> None:
        self._queue.clear()
        close = getattr(self._iterator, "close", None)
        if callable(close):
            close()


def prefetch_to_device(iterator, mesh: Mesh, size: int = 2) -> DevicePrefetcher:
    """Wraps a host batch iterator so that `size` batches are already sharded on `mesh` ahead of use."""
    return DevicePrefetcher(iterator, mesh, size)
