"""Host malloc settings that keep XLA:CPU's per-step temporaries mapped between steps.

XLA:CPU allocates each step's temporary buffers with malloc and frees them when the step ends (485 MiB
for a ResNet ngf 64 pix2pix step at 256 px). With glibc's defaults those large blocks are mmap-ed and
unmapped again, or trimmed off the top of the heap, so every step page-faults its whole working set in
afresh: 130k minor faults and ~0.23 s of system time per ResNet ngf 64 step on one core, ~10% of the
step (docs/performance.md). Keeping freed memory in malloc's heaps, untrimmed, removes those faults.

The cost is that the process keeps its high-water mark of host memory instead of returning it, which is
what a training process does anyway. Entry points (`ganjax.main`, `benchmarks.run`) call `configure()`
before jax starts its thread pool; `GANJAX_HOST_MALLOC=system` keeps glibc's defaults. Not glibc (macOS,
musl): nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV_VAR = "GANJAX_HOST_MALLOC"
MODES = ("keep", "system")

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# What configure("keep") sets: no mmap-ed blocks, and the largest trim threshold mallopt takes (2 GiB, an
# int): free memory at the top of a heap is only returned beyond that.
SETTINGS = {"mmap_max": 0, "trim_threshold": 2**31 - 1}
# On a process pinned to one core, also a single arena: XLA's worker threads would otherwise get arenas of
# their own, whose freed blocks still fault (one-core ResNet ngf 64 step 1.07 x PyTorch with it, 1.11
# without). With several cores a single arena's lock costs more than it saves (2-core aging demo: 6.0 steps/s
# with it, 6.5 without, 6.25 with glibc's defaults).
SINGLE_CORE_SETTINGS = {"arena_max": 1}


def configure(mode: str | None = None) -> bool:
    """Applies `mode` ("keep" or "system"; default: $GANJAX_HOST_MALLOC, else "keep").

    Returns True when glibc accepted the "keep" settings, False for "system" or a libc without mallopt.
    Call it before the first jax computation: no step's buffers are mmap-ed before it, and the one-core
    arena limit binds the threads jax starts afterwards.
    """
    mode = (mode or os.environ.get(ENV_VAR) or "keep").strip().lower()
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r} is not one of {MODES}.")
    if mode == "system":
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = 1
    if len(os.sched_getaffinity(0)) == 1:
        ok &= libc.mallopt(_M_ARENA_MAX, SINGLE_CORE_SETTINGS["arena_max"])
    ok &= libc.mallopt(_M_MMAP_MAX, SETTINGS["mmap_max"])
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, SETTINGS["trim_threshold"])
    return bool(ok)


def _glibc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it, and only glibc's mallopt takes these)
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc
