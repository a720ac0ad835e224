import jax
import numpy as np
import pytest

from ganjax import sharding


def test_mesh_shape_fills_minus_one():
    assert sharding.mesh_shape((("data", -1),), 8) == {"data": 8}
    assert sharding.mesh_shape((("data", -1), ("fsdp", 2)), 8) == {"data": 4, "fsdp": 2}


@pytest.mark.parametrize(
    "axes, message",
    [
        ((("model", -1),), "must contain a 'data' axis"),
        ((("data", -1), ("fsdp", -1)), "at most one axis"),
        ((("data", 3), ("fsdp", -1)), "does not divide"),
        ((("data", 16),), "needs 16 devices"),
        ((("data", 0),), "positive or -1"),
    ],
)
def test_mesh_shape_errors_are_actionable(axes, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(axes, 8)


def test_shard_batch_splits_leading_axis_over_data():
    mesh = sharding.make_mesh((("data", -1),))
    assert mesh.shape["data"] == jax.device_count() == 8
    batch = {"image": np.arange(16 * 2, dtype=np.float32).reshape(16, 2)}
    arrays = sharding.shard_batch(batch, mesh)
    shards = arrays["image"].addressable_shards
    assert len(shards) == 8 and shards[0].data.shape == (2, 2)
    np.testing.assert_array_equal(np.asarray(arrays["image"]), batch["image"])


def test_fixed_mesh_smaller_than_device_count_uses_first_devices():
    mesh = sharding.make_mesh((("data", 2),))
    assert mesh.devices.tolist() == jax.devices()[:2]
