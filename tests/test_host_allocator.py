"""ganjax.host_allocator: freed step temporaries stay mapped, so the next step does not fault them in."""

import subprocess
import sys

import pytest

from ganjax import host_allocator

# mallocs and touches a 256 MiB block, frees it, does it again, and prints the minor page faults of the
# second round: what a train step pays for its temporaries when the previous step's were given back.
# (libc's malloc directly, as XLA:CPU allocates: numpy asks for huge pages, which fault 512x less often.)
_SECOND_ROUND_FAULTS = """
import ctypes, resource, sys
from ganjax import host_allocator
configured = host_allocator.configure(sys.argv[1])
libc = host_allocator._glibc()
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def round_trip():
    block = libc.malloc(2**28)
    ctypes.memset(block, 1, 2**28)
    libc.free(block)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(configured, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_round_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _SECOND_ROUND_FAULTS, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(host_allocator._glibc() is None, reason="glibc's mallopt only")
def test_keep_mode_reuses_freed_memory_without_page_faults():
    configured, faults_keep = _second_round_faults("keep")
    assert configured == "True"
    _, faults_system = _second_round_faults("system")
    pages = 2**28 // 4096
    assert faults_system > pages // 2  # glibc's default unmaps the block: every page faults again
    assert faults_keep < pages // 20  # kept in the heap: the second round touches mapped pages


def test_system_mode_changes_nothing_and_bad_modes_are_named(monkeypatch):
    assert host_allocator.configure("system") is False
    monkeypatch.setenv(host_allocator.ENV_VAR, "system")
    assert host_allocator.configure() is False
    with pytest.raises(ValueError, match="GANJAX_HOST_MALLOC='tcmalloc' is not one of"):
        host_allocator.configure("tcmalloc")
