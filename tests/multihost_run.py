"""`python -m ganjax.main` as ONE process that reads the data of N processes (for tests/test_multihost.py).

  python tests/multihost_run.py --as_processes=2 --config configs/pix2pix_cityscapes.py:smoke \
      --workdir /tmp/ref [more ganjax.main flags]

The train iterator is the concatenation, in process order, of the N per-process iterators that an
N-process job builds (process_index 0..N-1, each B / N examples), so every global batch equals that of
the N-process run, augmentation included; everything else is ganjax.main unchanged. Paired data only
(pix2pix and its distillation).
"""

import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ganjax import main  # noqa: E402  (after the path: run as a script from anywhere)
from ganjax.data import translation_pipeline  # noqa: E402
from ganjax.trainers import common  # noqa: E402

_AS_PROCESSES = flags.DEFINE_integer("as_processes", 1, "Read the data shards of this many processes.")


class ConcatenatedShards:
    """Iterator of {"a", "b"} batches: the N shards' local batches stacked in process order."""

    def __init__(self, iterators):
        self._iterators = iterators

    def __iter__(self):
        return self

    def __next__(self):
        batches = [next(it) for it in self._iterators]
        return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

    def get_state(self) -> dict:
        return {"processes": [it.get_state() for it in self._iterators]}

    def set_state(self, state: dict) -> None:
        for it, one in zip(self._iterators, state["processes"], strict=True):
            it.set_state(one)

    def close(self) -> None:
        for it in self._iterators:
            common.close_iterator(it)


def run(argv):
    real = translation_pipeline.make_paired_iterator
    count = _AS_PROCESSES.value

    def make_paired_iterator(data_config, *, global_batch_size, seed, process_index=0, process_count=1):
        assert (process_index, process_count) == (0, 1), "the reference run is one process"
        return ConcatenatedShards(
            [
                real(
                    data_config,
                    global_batch_size=global_batch_size,
                    seed=seed,
                    process_index=i,
                    process_count=count,
                )
                for i in range(count)
            ]
        )

    translation_pipeline.make_paired_iterator = make_paired_iterator
    main.main(argv)


if __name__ == "__main__":
    app.run(run)
