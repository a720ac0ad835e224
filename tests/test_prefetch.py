"""ganjax.prefetch: order, sharding, checkpoint state and close of the device prefetcher."""

import jax
import numpy as np
import pytest

from ganjax import prefetch, sharding


class CountingIterator:
    """Batch i is {"x": rows filled with i}; grain-like get_state / set_state / close."""

    def __init__(self, batch=8, limit=None):
        self.position, self.batch, self.limit, self.closed = 0, batch, limit, False

    def __iter__(self):
        return self

    def __next__(self):
        if self.limit is not None and self.position >= self.limit:
            raise StopIteration
        value = np.full((self.batch, 3), self.position, np.float32)
        self.position += 1
        return {"x": value}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((("data", -1), ("fsdp", 1)))


def first_value(batch):
    return float(np.asarray(batch["x"])[0, 0])


@pytest.mark.parametrize("size", [1, 2, 3])
def test_batches_in_order_and_sharded(mesh, size):
    batches = prefetch.prefetch_to_device(CountingIterator(), mesh, size=size)
    for i in range(5):
        batch = next(batches)
        assert isinstance(batch["x"], jax.Array)
        assert batch["x"].sharding == sharding.batch_sharding(mesh)
        assert first_value(batch) == i
    # The wrapped iterator is ahead by size - 1 batches; the prefetcher's state is the consumer's.
    assert batches._iterator.position == 5 + size - 1
    assert batches.get_state() == {"position": 5}


def test_state_resumes_at_the_next_unconsumed_batch(mesh):
    batches = prefetch.prefetch_to_device(CountingIterator(), mesh, size=3)
    for _ in range(4):
        next(batches)
    saved = batches.get_state()
    expected = first_value(next(batches))
    resumed = prefetch.prefetch_to_device(CountingIterator(), mesh, size=3)
    resumed.set_state(saved)
    assert first_value(next(resumed)) == expected == 4
    # set_state on a running prefetcher drops what it had prefetched
    batches.set_state({"position": 1})
    assert first_value(next(batches)) == 1


def test_end_of_data_and_close(mesh):
    inner = CountingIterator(limit=3)
    batches = prefetch.prefetch_to_device(inner, mesh, size=2)
    assert [first_value(b) for b in batches] == [0, 1, 2]
    batches.close()
    assert inner.closed


def test_size_must_be_positive(mesh):
    with pytest.raises(ValueError, match="prefetch size"):
        prefetch.prefetch_to_device(CountingIterator(), mesh, size=0)
