"""Shared pieces of benchmarks/run.py: the machine description, interleaved timing, peak matmul FLOP/s.

Timing rule (`interleaved`): after compiling (timed separately by the caller) and `warmup` untimed calls
of each function, the functions are called in turn, one call each per round, for `repeats` rounds, the
order reversed every other round (so that neither framework always runs on a cache or a CPU frequency the
other left behind). Each call is timed by wall clock and by process CPU time (all threads; on a loaded
machine the wall clock counts the time other processes held the cores, the CPU time does not, but it does
count threads that spin while waiting).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info() -> dict:
    """CPU, cores, memory, jax backend and device, package versions and the thread settings."""
    import jax

    devices = jax.devices()
    info = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "devices": [str(d) for d in devices[:8]],
        "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")},
        "versions": {
            name: _version(name)
            for name in ("jax", "jaxlib", "flax", "optax", "torch", "numpy", "grain", "tensorflow-datasets")
        },
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def summarize(wall: list[float], cpu: list[float]) -> dict:
    return {
        "median_s": statistics.median(wall),
        "min_s": min(wall),
        "times_s": wall,
        "cpu_median_s": statistics.median(cpu),
        "cpu_times_s": cpu,
    }


def interleaved(fns: dict[str, Callable[[], None]], *, warmup: int, repeats: int) -> dict[str, dict]:
    """{name: summarize(...)} of each blocking callable, timed in turn as the module docstring says;
    "first_call_s" is the first warm-up call (the first run of a compiled step allocates its buffers)."""
    out = {name: {} for name in fns}
    for name, fn in fns.items():
        for i in range(warmup):
            t0 = time.perf_counter()
            fn()
            if i == 0:
                out[name]["first_call_s"] = time.perf_counter() - t0
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    order = list(fns)
    for r in range(repeats):
        for name in order if r % 2 == 0 else reversed(order):
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    for name in fns:
        out[name].update(summarize(wall[name], cpu[name]))
    return out


def matmul_flops(n: int, *, repeats: int, torch_module=None) -> dict:
    """FLOP/s of an n x n float32 matmul (2 n^3 FLOPs): jax on its default device and, given the torch
    module, PyTorch on the CPU (its set threads). The device's practical peak for dense float32 math."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    x = jnp.asarray(a)
    f = jax.jit(lambda x: x @ x).lower(x).compile()
    fns = {"jax": lambda: f(x).block_until_ready()}
    if torch_module is not None:
        xt = torch_module.from_numpy(a)
        fns["torch"] = lambda: torch_module.mm(xt, xt)
    times = interleaved(fns, warmup=1, repeats=repeats)
    flops = 2.0 * n**3
    return {
        "n": n,
        "flops": flops,
        **{f"{k}_median_s": v["median_s"] for k, v in times.items()},
        **{f"{k}_gflops": flops / v["median_s"] / 1e9 for k, v in times.items()},
        **{f"{k}_best_gflops": flops / v["min_s"] / 1e9 for k, v in times.items()},
    }
