"""Test setup: 8 fake CPU devices (before jax is imported), absl flags parsed, offline data dirs."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# grain's multiprocessing and some absl users need parsed flags outside absl.app.run.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
