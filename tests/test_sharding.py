import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from configs import pix2pix_cityscapes
from ganjax import sharding
from ganjax.trainers import pix2pix


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


def test_unknown_axis_names_are_rejected():
    with pytest.raises(ValueError, match=r"unknown axis names \['model'\]"):
        sharding.mesh_shape((("data", -1), ("model", 2)), 8)


def test_a_multi_process_mesh_must_use_every_device(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="must use all of them"):
        sharding.make_mesh((("data", 2),))


def test_batches_are_split_over_data_and_fsdp_jointly():
    mesh = sharding.make_mesh((("data", 2), ("fsdp", -1)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4} and sharding.data_parallel_size(mesh) == 8
    assert sharding.batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
    batch = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
    arrays = sharding.shard_batch(batch, mesh)
    rows = {shard.device: shard.data for shard in arrays["image"].addressable_shards}
    assert all(r.shape == (2, 3) for r in rows.values())
    # Device (data=i, fsdp=j) holds rows 2 * (4 i + j) and the next: the batch runs over both axes.
    np.testing.assert_array_equal(rows[mesh.devices[1, 2]], batch["image"][12:14])
    np.testing.assert_array_equal(sharding.to_host(arrays)["image"], batch["image"])
    # A data-only mesh (older configs, tests) still splits over data alone.
    assert sharding.batch_sharding(sharding.make_mesh((("data", -1),))).spec == PartitionSpec("data")


def adam_state(shapes):
    params = {name: jax.ShapeDtypeStruct(shape, np.float32) for name, shape in shapes.items()}
    return {
        "step": jax.ShapeDtypeStruct((), np.int32),
        "g_params": params,
        "g_opt_state": jax.eval_shape(optax.adam(1e-3).init, params),
    }


FSDP_MESH = (("data", 2), ("fsdp", 4))


def specs(state, rules, min_size=0, axes=FSDP_MESH):
    tree, notes = sharding.partition_specs(state, sharding.make_mesh(axes), rules, min_size=min_size)
    flat = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return {jax.tree_util.keystr(p, simple=True, separator="/"): s for p, s in flat}, notes


def test_fsdp_rule_shards_the_largest_divisible_axis_and_mirrors_it_in_adam():
    state = adam_state({"kernel": (3, 3, 16, 32), "square": (8, 8), "odd": (3, 6, 5), "bias": (32,)})
    got, notes = specs(state, ((".*", "fsdp"),))
    assert got["g_params/kernel"] == PartitionSpec(None, None, None, "fsdp")  # 32 > 16
    assert got["g_params/square"] == PartitionSpec(None, "fsdp")  # a tie: the last axis
    assert got["g_params/bias"] == PartitionSpec("fsdp")
    assert got["g_params/odd"] == PartitionSpec() and set(notes) == {
        f"{prefix}odd: no axis of (3, 6, 5) is divisible by fsdp = 4"
        for prefix in ("g_params/", "g_opt_state/0/mu/", "g_opt_state/0/nu/")
    }
    assert got["step"] == got["g_opt_state/0/count"] == PartitionSpec()
    for name in ("kernel", "square", "bias"):
        assert got[f"g_opt_state/0/mu/{name}"] == got[f"g_opt_state/0/nu/{name}"] == got[f"g_params/{name}"]

    # Small arrays stay replicated without a note; without an fsdp axis everything does.
    got, notes = specs(state, ((".*", "fsdp"),), min_size=100)
    assert got["g_params/bias"] == PartitionSpec() and got["g_params/kernel"] != PartitionSpec()
    got, _ = specs(state, ((".*", "fsdp"),), axes=(("data", -1),))
    assert set(got.values()) == {PartitionSpec()}


def test_rules_apply_in_order_and_explicit_specs_fall_back_to_replication():
    state = adam_state({"conv/kernel": (3, 3, 16, 6), "conv/bias": (16,), "head/kernel": (3, 3, 16, 3)})
    rules = (
        (r"bias$", "replicate"),
        (r"kernel$", (None, None, "fsdp", None)),  # explicit: shard the input features
        (r".*", "fsdp"),
    )
    got, notes = specs(state, rules)
    assert got["g_params/conv/bias"] == PartitionSpec()
    assert (
        got["g_params/conv/kernel"]
        == got["g_opt_state/0/nu/conv/kernel"]
        == PartitionSpec(None, None, "fsdp")  # canonical: no trailing None
    )
    got, notes = specs(state, ((r"kernel$", (None, None, None, "fsdp")),))
    assert got["g_params/conv/kernel"] == PartitionSpec()  # 6 output features over 4 devices
    assert "g_params/conv/kernel: axis of size 6 is not divisible by fsdp = 4" in notes
    # Axes the mesh lacks are dropped (a config with rules on a data-only mesh).
    got, _ = specs(state, ((r"kernel$", (None, None, "fsdp", None)),), axes=(("data", -1),))
    assert set(got.values()) == {PartitionSpec()}


@pytest.mark.parametrize(
    "rules, message",
    [
        (((r"(", "fsdp"),), "bad regex"),
        (((r".*", "model"),), "is not 'fsdp', 'replicate'"),
        ((r".*",), r"a \(regex, how\) pair"),
        (((r".*", 3),), "is not a valid sharding"),
    ],
)
def test_bad_rules_are_reported(rules, message):
    with pytest.raises(ValueError, match=message):
        specs(adam_state({"w": (4,)}), rules)


def test_trainer_state_shardings_come_from_config_mesh(tmp_path):
    config = pix2pix_cityscapes.get_config("smoke")
    config.mesh.axes = FSDP_MESH
    config.mesh.min_shard_size = 0
    *_, state_sharding = pix2pix._setup(config, str(tmp_path))
    flat = {
        jax.tree_util.keystr(p, simple=True, separator="/"): s.spec
        for p, s in jax.tree_util.tree_leaves_with_path(state_sharding)
    }
    params = {path: spec for path, spec in flat.items() if path.startswith(("g_params/", "d_params/"))}
    assert sum(spec != PartitionSpec() for spec in params.values()) > len(params) // 2
    for path, spec in params.items():  # Adam's moments mirror their parameter
        net, rest = path.split("_params/", 1)
        assert flat[f"{net}_opt_state/0/mu/{rest}"] == flat[f"{net}_opt_state/0/nu/{rest}"] == spec, path

    config.mesh.axes = (("data", -1), ("fsdp", 1))  # the shipped default: replicated
    *_, state_sharding = pix2pix._setup(config, str(tmp_path))
    assert {s.spec for s in jax.tree.leaves(state_sharding)} == {PartitionSpec()}


# ---- Multi-process runtime ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ, tpu_chips, expected",
    [
        ({}, False, None),
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, False, None),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, False, None),  # salloc shell, not inside srun
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "4"}, False, "SLURM"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, False, "Open MPI"),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, False, "JAX_COORDINATOR_ADDRESS"),
        ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, False, "TPU worker list"),
        ({}, True, "Cloud TPU VM"),
    ],
)
def test_detect_cluster(environ, tpu_chips, expected):
    reason = sharding.detect_cluster(environ, tpu_chips=tpu_chips)
    assert reason is None if expected is None else expected in reason


def test_initialize_distributed_calls_jax_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    coordinator = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert not sharding.initialize_distributed("auto", {}, tpu_chips=False)
    assert not sharding.initialize_distributed("off", coordinator, tpu_chips=True)
    assert calls == []
    assert sharding.initialize_distributed("auto", coordinator, tpu_chips=False)
    assert sharding.initialize_distributed("on", {}, tpu_chips=False)  # JAX's own cluster detection
    assert calls == [{"num_processes": 2, "process_id": 1}, {}]
    with pytest.raises(ValueError, match="--distributed='yes'"):
        sharding.initialize_distributed("yes", {})
