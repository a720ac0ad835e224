"""The pix2pix trainer end to end on the :smoke config (batch norm and dropout, as the reference's
defaults, on a small ResNet): real data pipeline, orbax, clu writers.

Full runs are expensive (each compiles the step), so one 8-device reference run is shared by the module
and the other tests compare against it. Exact resumption, NaN stops and stop signals are tested for every
trainer in tests/test_reliability.py.
"""

import glob
import logging
import os

import jax
import numpy as np
import pytest
import run_helpers

from configs import pix2pix_cityscapes
from ganjax import checkpoint, main, sharding
from ganjax.trainers import common, pix2pix
from ganjax.trainers import translation_common as tc
from ganjax.trainers.common import read_metrics

LOSS_KEYS = ("g_total", "d_total", "g_adversarial", "g_l1", "d_real_logit", "d_fake_logit")
EVAL_KEYS = {"gt_l1", "copy_l1", "pixel_accuracy", "mean_class_accuracy", "mean_iou"}


def smoke_config(data_dir, **overrides):
    return run_helpers.smoke_config(pix2pix_cityscapes, data_dir, **overrides)


def losses_by_step(workdir):
    return run_helpers.losses_by_step(workdir, LOSS_KEYS)


class _Compiles(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        if record.getMessage().startswith("Compiling jit(train_step)"):
            self.messages.append(record.getMessage())


class Stopped(Exception):
    pass


def stop_before_step(monkeypatch, step):
    """Makes the train loop stop when it fetches the batch of `step` (1-based)."""
    real, calls = sharding.shard_batch, []

    def shard_batch(batch, mesh):
        calls.append(1)
        if len(calls) == step:
            raise Stopped(f"stopped before step {step}")
        return real(batch, mesh)

    monkeypatch.setattr(sharding, "shard_batch", shard_batch)


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """4 steps on the 8 fake devices, every step logged, checkpoints at 2 and 4; returns the workdir."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    handler = _Compiles()
    logging.getLogger().addHandler(handler)
    try:
        with jax.log_compiles(True):
            main.run(smoke_config(data_dir), workdir)
    finally:
        logging.getLogger().removeHandler(handler)
    assert len(handler.messages) == 1, handler.messages  # the step compiles once
    return workdir


def test_smoke_run_writes_everything_and_eval_mode_agrees(reference_run, data_dir):
    metrics = read_metrics(reference_run)
    assert sorted(losses_by_step(reference_run)) == [1, 2, 3, 4]
    final = metrics[4]
    for key in LOSS_KEYS + ("g_grad_norm", "d_param_norm", "learning_rate"):
        assert np.isfinite(final[key]), key
    # constant for num_steps - decay_steps = 2 updates, then 1 - k / (decay_steps + 1).
    lr = [metrics[s]["learning_rate"] for s in (1, 2, 3, 4)]
    np.testing.assert_allclose(lr, 2e-4 * np.array([1, 1, 2 / 3, 1 / 3]), rtol=1e-6)
    assert {k.removeprefix("eval/") for k in final if k.startswith("eval/")} == EVAL_KEYS
    assert 0 <= final["eval/pixel_accuracy"] <= 1 and final["eval/gt_l1"] > 0
    assert glob.glob(os.path.join(reference_run, "events.out.tfevents.*")), "no TensorBoard file"
    assert os.path.exists(os.path.join(reference_run, "samples", "translation_0000004.png"))
    assert checkpoint.Checkpointer(os.path.join(reference_run, "checkpoints")).all_steps() == [2, 4]
    saved = common.load_run_config(reference_run)  # what translate / export rebuild the networks from
    assert saved.model.to_dict() == smoke_config(data_dir).model.to_dict()

    # eval mode restores step 4 and, with the same per-image dropout masks, reproduces the in-loop scores.
    eval_metrics = main.run(smoke_config(data_dir), reference_run, mode="eval")
    assert set(eval_metrics) == EVAL_KEYS
    for key, value in eval_metrics.items():
        np.testing.assert_allclose(value, final[f"eval/{key}"], rtol=1e-5, err_msg=key)
    assert os.path.exists(os.path.join(reference_run, "samples", "eval_0000004.png"))


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
    _, _, _, _, _, _, init, state_sharding = pix2pix._setup(config, workdir)
    abstract = jax.eval_shape(init, tc.init_key(0))
    return jax.tree.map(lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s), abstract, state_sharding)


def test_init_from_loads_the_named_networks_only(reference_run, data_dir, tmp_path):
    config = smoke_config(data_dir)
    config.init_from.generator = reference_run
    fresh = zero_state(config, str(tmp_path / "new"))
    state = tc.apply_init_from(config, fresh)
    saved, _ = checkpoint.Checkpointer(os.path.join(reference_run, "checkpoints")).restore(4, fresh)
    for field in ("g_params", "g_batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, getattr(state, field), getattr(saved, field))
    jax.tree.map(np.testing.assert_array_equal, state.d_params, fresh.d_params)
    assert int(state.step) == 0  # a new run: step, optimizer state and data order start afresh

    # One step folder can be named too, and the discriminator alone.
    config.init_from.generator = ""
    config.init_from.discriminator = os.path.join(reference_run, "checkpoints", "2")
    state = tc.apply_init_from(config, fresh)
    saved, _ = checkpoint.Checkpointer(os.path.join(reference_run, "checkpoints")).restore(2, fresh)
    jax.tree.map(np.testing.assert_array_equal, state.d_params, saved.d_params)
    jax.tree.map(np.testing.assert_array_equal, state.g_params, fresh.g_params)


def test_init_from_errors_name_the_key_and_the_parameter(reference_run, data_dir, tmp_path):
    config = smoke_config(data_dir, init_from__generator=str(tmp_path / "nowhere"))
    fresh = zero_state(config, str(tmp_path / "new"))
    with pytest.raises(FileNotFoundError, match="config.init_from.generator .* does not exist"):
        tc.apply_init_from(config, fresh)
    config.init_from.generator = str(tmp_path)  # exists, holds no checkpoint
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        tc.apply_init_from(config, fresh)

    wider = smoke_config(data_dir, model__ngf=8, init_from__generator=reference_run)
    with pytest.raises(checkpoint.CheckpointShapeError, match="generator: 'g_batch_stats/.*' has shape"):
        tc.apply_init_from(wider, zero_state(wider, str(tmp_path / "wider")))


def test_resume_order_workdir_then_init_from(reference_run, data_dir, tmp_path, monkeypatch):
    calls = []
    real = tc.apply_init_from
    monkeypatch.setattr(tc, "apply_init_from", lambda config, state: calls.append(1) or real(config, state))
    # A workdir with a checkpoint wins: init_from (here a path that does not exist) is not even read.
    main.run(smoke_config(data_dir, init_from__generator=str(tmp_path / "nowhere")), reference_run)
    assert calls == []
    # A fresh workdir takes init_from (stopped before the first step, so nothing compiles).
    stop_before_step(monkeypatch, 1)
    with pytest.raises(Stopped):
        main.run(smoke_config(data_dir, init_from__generator=reference_run), str(tmp_path / "fresh"))
    assert calls == [1]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("loss__adversarial", "wgan", "loss.adversarial"),
        ("data__name", "unaligned_folders", "has no pairs"),
        ("model__generator", "unet_128", "multiple of 128 for model.generator = 'unet_128'"),
        ("data__crop_size", 30, "multiple of 4"),
        ("data__direction", "AtoC", "data.direction"),
        ("disc__num_layers", 4, "lower disc.num_layers"),
        ("train__decay_steps", 5, "train.decay_steps"),
        ("model__norm", "group", "model.norm"),
        ("train__learning_rate", -1.0, "train.learning_rate"),
    ],
)
def test_bad_configs_fail_early_with_the_key_named(data_dir, key, value, message):
    config = smoke_config(data_dir, **{key: value})
    with pytest.raises(common.ConfigError, match=message):
        pix2pix.validate_config(config)


@pytest.mark.parametrize("variant", ["", "synthetic", "smoke"])
def test_shipped_configs_are_valid(variant):
    pix2pix.validate_config(pix2pix_cityscapes.get_config(variant))


def test_batch_not_divisible_by_devices_is_reported(data_dir, tmp_path):
    config = smoke_config(data_dir, train__batch_size=6)
    with pytest.raises(common.ConfigError, match="not divisible by the mesh's data axis"):
        main.run(config, str(tmp_path / "bad_batch"))
