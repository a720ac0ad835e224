"""The aging trainer end to end on the :smoke config: real data pipeline, orbax, clu writers.

Exact resumption, NaN stops and stop signals are tested for every trainer in tests/test_reliability.py.
"""

import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import run_helpers

from configs import aging_utkface
from ganjax import checkpoint, main
from ganjax.trainers import aging, common
from ganjax.trainers.common import read_metrics

LOSS_KEYS = ("g_total", "d_total", "estimator", "adversarial", "age", "reconstruction")


def smoke_config(data_dir, **overrides):
    return run_helpers.smoke_config(aging_utkface, data_dir, **overrides)


def losses_by_step(workdir):
    return run_helpers.losses_by_step(workdir, LOSS_KEYS)


def test_smoke_run_writes_everything_and_compiles_the_step_once(data_dir, tmp_path, caplog):
    config = smoke_config(data_dir)
    workdir = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        main.run(config, workdir)
    step_compiles = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(train_step)")]
    assert len(step_compiles) == 1, [r.getMessage()[:120] for r in step_compiles]

    metrics = read_metrics(workdir)
    assert sorted(s for s, v in metrics.items() if "g_total" in v) == [2, 4, 6]
    final = metrics[6]
    for key in LOSS_KEYS + ("g_grad_norm", "d_param_norm", "eval/age_mae", "eval/gt_l1"):
        assert np.isfinite(final[key]), key
    assert final["eval/copy_l1"] > 0
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*")), "no TensorBoard file"
    assert os.path.exists(os.path.join(workdir, "samples", "progression_0000006.png"))
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [3, 6]

    # eval mode restores the latest checkpoint and reports the same metric names.
    eval_metrics = main.run(config, workdir, mode="eval")
    assert set(eval_metrics) == {"age_mae", "gt_l1", "copy_l1", "gt_l1_ratio", "aged_age_mae"}


@pytest.mark.parametrize("output, steps", [("residual", 3), ("mask", 2)])
def test_one_device_and_eight_devices_give_the_same_losses(data_dir, tmp_path, output, steps):
    # The mask output amplifies the float reduction-order differences of 8 devices faster (measured:
    # 1.5e-5 relative at step 2, 5e-4 at step 3, against 4e-7 and 4e-6 for the residual output).
    runs = {}
    for axes in ((("data", 1),), (("data", -1),)):
        config = smoke_config(data_dir, train__num_steps=steps, log__every_steps=1, model__output=output)
        config.mesh.axes = axes
        workdir = str(tmp_path / f"mesh{axes[0][1]}")
        main.run(config, workdir)
        runs[axes[0][1]] = losses_by_step(workdir)
    assert runs[1].keys() == runs[-1].keys() == set(range(1, steps + 1))
    for step in runs[1]:
        np.testing.assert_allclose(runs[1][step], runs[-1][step], rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("loss__adversarial", "wgan", "loss.adversarial"),
        ("data__age_max", 150.0, "age_min/age_max"),
        ("aging__conditioning", "film", "aging.conditioning"),
        ("data__size", 30, "data.size"),
        ("train__g_learning_rate", -1.0, "train.g_learning_rate"),
        ("train__decay_steps", 7, "train.decay_steps"),
        ("aging__basis_scale", 0.0, "aging.basis_scale"),
        ("loss__mask_weight", -0.5, "loss.mask_weight"),
        ("loss__colour_weight", -0.5, "loss.colour_weight"),
        ("loss__age_weight_end", -1.0, "loss.age_weight_end"),
        ("loss__age_weight_steps", 0, "loss.age_weight_steps"),
    ],
)
def test_bad_configs_fail_early_with_the_key_named(data_dir, key, value, message):
    config = smoke_config(data_dir, **{key: value})
    with pytest.raises(common.ConfigError, match=message):
        aging.validate_config(config)


@pytest.mark.parametrize("key", ["loss__mask_weight", "loss__colour_weight"])
def test_mask_losses_need_the_mask_output(data_dir, key):
    config = smoke_config(data_dir, model__output="residual", **{key: 0.5})
    with pytest.raises(common.ConfigError, match='model.output = "mask"'):
        aging.validate_config(config)


@pytest.mark.parametrize(
    "key, metric",
    [
        ("loss__mask_weight", "mask"),  # the mask penalty shrinks the blend mask
        ("loss__colour_weight", "colour"),  # the colour loss draws the input face under the mask
    ],
)
def test_mask_output_losses_lower_their_term_after_one_update(data_dir, tmp_path, key, metric):
    values = {}
    for weight in (1e-3, 100.0):
        config = smoke_config(
            data_dir, train__num_steps=2, log__every_steps=1, model__output="mask", **{key: weight}
        )
        workdir = str(tmp_path / f"{metric}{weight}")
        main.run(config, workdir)
        metrics = read_metrics(workdir)
        values[weight] = [metrics[step][metric] for step in (1, 2)]
    # Same initial term; after one update the heavily weighted G has lowered it.
    assert values[1e-3][0] > 0
    np.testing.assert_allclose(values[1e-3][0], values[100.0][0], rtol=1e-6)
    assert values[100.0][1] < values[100.0][0]
    assert values[100.0][1] < values[1e-3][1]


def test_age_weight_moves_linearly_to_its_end_value_when_one_is_set(data_dir):
    unset = smoke_config(
        data_dir, loss__age_weight=0.3, loss__age_weight_end=None, loss__age_weight_steps=None
    )
    constant = aging.StepSettings.from_config(unset)
    scheduled = aging.StepSettings.from_config(
        smoke_config(
            data_dir,
            train__num_steps=100,
            loss__age_weight=1.0,
            loss__age_weight_end=0.2,
            loss__age_weight_steps=None,  # unset: the weight moves over all of train.num_steps
        )
    )
    for step, expected in ((0, 1.0), (50, 0.6), (100, 0.2), (150, 0.2)):
        np.testing.assert_allclose(aging.age_weight_at(jnp.int32(step), scheduled), expected, rtol=1e-6)
        np.testing.assert_allclose(aging.age_weight_at(jnp.int32(step), constant), 0.3, rtol=1e-6)


def test_age_weight_steps_without_an_end_value_is_reported(data_dir):
    config = smoke_config(data_dir, loss__age_weight_end=None, loss__age_weight_steps=10)
    with pytest.raises(common.ConfigError, match="set age_weight_end or unset age_weight_steps"):
        aging.validate_config(config)


def test_age_weight_reaches_its_end_value_at_age_weight_steps_and_stays(data_dir):
    config = smoke_config(
        data_dir,
        train__num_steps=100,
        loss__age_weight=1.0,
        loss__age_weight_end=0.0,
        loss__age_weight_steps=40,
    )
    settings = aging.StepSettings.from_config(config)
    for step, expected in ((0, 1.0), (10, 0.75), (40, 0.0), (70, 0.0), (100, 0.0)):
        np.testing.assert_allclose(aging.age_weight_at(jnp.int32(step), settings), expected, atol=1e-7)


def test_batch_not_divisible_by_devices_is_reported(data_dir, tmp_path):
    config = smoke_config(data_dir, train__batch_size=6)
    with pytest.raises(common.ConfigError, match="not divisible by the mesh's data axis"):
        main.run(config, str(tmp_path / "bad_batch"))


def test_checkpoint_from_another_model_names_the_parameter(data_dir, tmp_path):
    workdir = str(tmp_path / "shapes")
    main.run(smoke_config(data_dir, train__num_steps=1), workdir)
    wider = smoke_config(data_dir, train__num_steps=2, model__base_features=16)
    with pytest.raises(checkpoint.CheckpointShapeError, match="has shape"):
        main.run(wider, workdir)


def test_learning_rates_decay_linearly_over_the_last_decay_steps(data_dir):
    config = smoke_config(data_dir, train__num_steps=10, train__decay_steps=4)
    g_tx, _ = aging.build_optimizers(config)
    params = {"w": np.ones(3, np.float32)}
    state = g_tx.init(params)
    sizes = []
    for _ in range(10):  # Adam's first steps have |update| = rate for a constant gradient
        updates, state = g_tx.update({"w": np.ones(3, np.float32)}, state, params)
        sizes.append(float(np.abs(updates["w"][0])))
    rate = config.train.g_learning_rate
    np.testing.assert_allclose(sizes[:6], rate, rtol=1e-4)
    np.testing.assert_allclose(sizes[6:], rate * np.array([4, 3, 2, 1]) / 5, rtol=1e-4)


def test_progression_rows_alternate_young_and_old_faces_of_distinct_identities():
    ages = np.tile(np.array([5, 15, 25, 35, 45, 55, 65, 75, 85], np.float32), 4)
    identity = np.repeat(np.arange(4), 9)
    picks = aging.pick_sample_faces({"identity": identity, "age": ages}, 4)
    assert list(identity[picks]) == [0, 1, 2, 3]
    assert list(ages[picks]) == [25, 75, 25, 75]
    # Real data (no identities): the first faces.
    unknown = {"identity": np.full(10, -1), "age": np.arange(10, dtype=np.float32)}
    assert list(aging.pick_sample_faces(unknown, 3)) == [0, 1, 2]
