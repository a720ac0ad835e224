"""Fixed-size batching for jitted evaluation functions (one compiled shape for any number of inputs)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def batched(fn: Callable, arrays: tuple[np.ndarray, ...], batch_size: int) -> np.ndarray:
    """Applies fn to fixed-size batches (the last one padded) so it compiles once; concatenates."""
    n = len(arrays[0])
    outputs = []
    for start in range(0, n, batch_size):
        chunk = [a[start : start + batch_size] for a in arrays]
        valid = len(chunk[0])
        if valid < batch_size:
            chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - valid, 0)]) for c in chunk]
        outputs.append(np.asarray(fn(*chunk))[:valid])
    return np.concatenate(outputs)
