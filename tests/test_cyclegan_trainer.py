"""The CycleGAN trainer end to end on the :smoke config, and the functional image pool.

Full runs are expensive (each compiles the step), so one 8-device reference run is shared by the module
and the other tests compare against it. The smoke pool (6 images) is smaller than the batch (8), so the
runs go through both pool regimes (filling, then swapping); tests/test_reliability.py checks that a resumed
run restores the pools exactly.
"""

import collections
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import run_helpers

from configs import cyclegan_horse2zebra
from ganjax import checkpoint, main
from ganjax.trainers import common, cyclegan
from ganjax.trainers import translation_common as tc
from ganjax.trainers.common import read_metrics
from ganjax.trainers.cyclegan import ImagePool, query_pool

LOSS_KEYS = ("g_total", "d_total", "g_a", "g_b", "cycle_a", "cycle_b", "idt_a", "idt_b", "d_a", "d_b")
SCORES = ("gt_l1", "copy_l1", "pixel_accuracy", "mean_class_accuracy", "mean_iou")
EVAL_KEYS = {f"{d}/{k}" for d in ("AtoB", "BtoA") for k in SCORES}


def smoke_config(data_dir, **overrides):
    return run_helpers.smoke_config(cyclegan_horse2zebra, data_dir, **overrides)


def losses_by_step(workdir):
    return run_helpers.losses_by_step(workdir, LOSS_KEYS)


# ---- The image pool ------------------------------------------------------------------------------


def tagged(values):
    """(B, 2, 2, 3) images whose every pixel is the image's tag, so images can be told apart."""
    return jnp.broadcast_to(jnp.asarray(values, jnp.float32)[:, None, None, None], (len(values), 2, 2, 3))


def tags(images):
    return [float(v) for v in np.asarray(images)[:, 0, 0, 0]]


def test_pool_stores_and_returns_images_until_full():
    pool = ImagePool.create(3, (2, 2, 3))
    pool, out = query_pool(pool, tagged([1, 2]), jax.random.key(0), 3)
    assert tags(out) == [1, 2] and int(pool.count) == 2
    assert tags(pool.images) == [1, 2, 0]
    pool, out = query_pool(pool, tagged([3]), jax.random.key(1), 3)
    assert tags(out) == [3] and int(pool.count) == 3 and tags(pool.images) == [1, 2, 3]


def test_full_pool_swaps_half_the_time_and_never_loses_an_image():
    size = 5
    pool, _ = query_pool(
        ImagePool.create(size, (2, 2, 3)), tagged(range(1, size + 1)), jax.random.key(0), size
    )
    query = jax.jit(query_pool, static_argnums=3)
    from_pool = 0
    for i in range(400):
        new = size + 1 + i
        before = tags(pool.images)
        pool, out = query(pool, tagged([new]), jax.random.key(100 + i), size)
        (returned,) = tags(out)
        after = tags(pool.images)
        # The reference's rule: either the new image comes back and the pool is unchanged, or a stored
        # image comes back and the new one takes its slot.
        if returned == new:
            assert after == before
        else:
            from_pool += 1
            slot = before.index(returned)
            assert after == before[:slot] + [new] + before[slot + 1 :]
        assert int(pool.count) == size
    assert 150 < from_pool < 250  # p = 1/2
    # Every slot gets replaced over time (uniform slot choice).
    assert all(t > size for t in tags(pool.images))


def test_pool_handles_a_batch_in_order_and_is_deterministic():
    size = 3
    pool = ImagePool.create(size, (2, 2, 3))
    new_pool, out = query_pool(pool, tagged([1, 2, 3, 4, 5, 6, 7]), jax.random.key(7), size)
    again_pool, again = query_pool(pool, tagged([1, 2, 3, 4, 5, 6, 7]), jax.random.key(7), size)
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(new_pool.images, again_pool.images)
    assert tags(out)[:3] == [1, 2, 3]  # filling: each image is stored and returned
    # Then nothing is lost or duplicated: stored + returned = the inputs + the 3 kept while filling.
    stored_and_returned = collections.Counter(tags(new_pool.images) + tags(out))
    assert stored_and_returned == collections.Counter([1, 2, 3, 4, 5, 6, 7] + [1, 2, 3])


def test_pool_of_size_zero_passes_images_through():
    pool = ImagePool.create(0, (2, 2, 3))
    new_pool, out = query_pool(pool, tagged([4, 5]), jax.random.key(0), 0)
    assert tags(out) == [4, 5] and new_pool is pool


# ---- The trainer -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """4 steps on the 8 fake devices, every step logged, checkpoints at 2 and 4; returns the workdir."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    main.run(smoke_config(data_dir), workdir)
    return workdir


def test_smoke_run_writes_everything_and_eval_mode_agrees(reference_run, data_dir):
    metrics = read_metrics(reference_run)
    assert sorted(losses_by_step(reference_run)) == [1, 2, 3, 4]
    final = metrics[4]
    for key in LOSS_KEYS + ("g_grad_norm", "d_param_norm", "learning_rate"):
        assert np.isfinite(final[key]), key
    assert {k.removeprefix("eval/") for k in final if k.startswith("eval/")} == EVAL_KEYS
    assert glob.glob(os.path.join(reference_run, "events.out.tfevents.*")), "no TensorBoard file"
    for direction in ("AtoB", "BtoA"):
        assert os.path.exists(os.path.join(reference_run, "samples", f"translation_{direction}_0000004.png"))
    ckpt = checkpoint.Checkpointer(os.path.join(reference_run, "checkpoints"))
    assert ckpt.all_steps() == [2, 4]
    # The pools are part of the state: after 4 steps of 8 images, both are full.
    state, _ = ckpt.restore(4, zero_state(smoke_config(data_dir), reference_run))
    for pool in (state.fake_a_pool, state.fake_b_pool):
        assert int(pool.count) == 6 and float(jnp.min(jnp.abs(pool.images).sum(axis=(1, 2, 3)))) > 0

    eval_metrics = main.run(smoke_config(data_dir), reference_run, mode="eval")
    assert set(eval_metrics) == EVAL_KEYS
    for key, value in eval_metrics.items():
        np.testing.assert_allclose(value, final[f"eval/{key}"], rtol=1e-5, err_msg=key)


def test_one_device_gives_the_losses_of_eight(reference_run, data_dir, tmp_path):
    config = smoke_config(data_dir)
    config.mesh.axes = (("data", 1),)
    workdir = str(tmp_path / "one_device")
    main.run(config, workdir)
    one, eight = losses_by_step(workdir), losses_by_step(reference_run)
    assert one.keys() == eight.keys() == {1, 2, 3, 4}
    for step in one:
        np.testing.assert_allclose(one[step], eight[step], rtol=2e-4, atol=1e-5, err_msg=f"step {step}")


def zero_state(config, workdir):
    """A state of the config's structure, shapes and shardings, all zeros (nothing to compile)."""
    _, _, _, _, _, _, init, state_sharding = cyclegan._setup(config, workdir)
    abstract = jax.eval_shape(init, tc.init_key(0))
    return jax.tree.map(lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s), abstract, state_sharding)


def test_init_from_loads_both_generators(reference_run, data_dir, tmp_path):
    config = smoke_config(data_dir, init_from__generator=os.path.join(reference_run, "checkpoints"))
    fresh = zero_state(config, str(tmp_path / "new"))
    state = tc.apply_init_from(config, fresh)
    saved, _ = checkpoint.Checkpointer(os.path.join(reference_run, "checkpoints")).restore(4, fresh)
    assert set(state.g_params) == {"G_A", "G_B"}
    jax.tree.map(np.testing.assert_array_equal, state.g_params, saved.g_params)
    jax.tree.map(np.testing.assert_array_equal, state.d_params, fresh.d_params)
    assert int(state.fake_a_pool.count) == 0  # pools and optimizer state start afresh

    wider = smoke_config(data_dir, model__ngf=8, init_from__generator=reference_run)
    with pytest.raises(checkpoint.CheckpointShapeError, match="g_params/G_A/.* has shape"):
        tc.apply_init_from(wider, zero_state(wider, str(tmp_path / "wider")))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("loss__adversarial", "wgan", "loss.adversarial"),
        ("train__pool_size", -1, "train.pool_size"),
        ("loss__cycle_a_weight", -10.0, "loss.cycle_a_weight"),
        ("model__generator", "resnet_12blocks", "model.generator"),
        ("data__crop_size", 40, "data.crop_size"),
        ("train__decay_steps", 9, "train.decay_steps"),
    ],
)
def test_bad_configs_fail_early_with_the_key_named(data_dir, key, value, message):
    config = smoke_config(data_dir, **{key: value})
    with pytest.raises(common.ConfigError, match=message):
        cyclegan.validate_config(config)


def test_same_domains_are_refused(data_dir):
    config = smoke_config(data_dir)
    config.data.synthetic.domain_b = "photo_a"
    with pytest.raises(common.ConfigError, match="pick two different ones"):
        cyclegan.validate_config(config)


@pytest.mark.parametrize("variant", ["", "synthetic", "smoke"])
def test_shipped_configs_are_valid(variant):
    cyclegan.validate_config(cyclegan_horse2zebra.get_config(variant))
