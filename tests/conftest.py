"""Test setup: 8 fake CPU devices (before jax is imported), absl flags parsed, offline data dirs, and one
persistent compilation cache for the session (many modules compile the same smoke-config steps)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# grain's multiprocessing and some absl users need parsed flags outside absl.app.run.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


import jax  # noqa: E402
import pytest  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
    """A fresh (per session) persistent compilation cache: the second module that compiles a step gets
    the executable from disk. Only compile time changes; the previous settings come back at the end."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {name: getattr(jax.config, name) for name in names}
    values = (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0)
    for name, value in zip(names, values, strict=True):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield values[0]
    for name, value in before.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS data dir per test module: built-in datasets are built there on first use."""
    return str(tmp_path_factory.mktemp("tfds"))
