"""The independent age regressor: trains on the :smoke synthetic faces, and its MAE (in-loop, --mode eval and
through `age_accuracy.load_regressor`) equals a hand computation from its logits."""

import json
import os

import jax
import numpy as np
import pytest

from configs import age_regressor as regressor_config
from ganjax import main
from ganjax.data import pipeline
from ganjax.evaluation import age_accuracy
from ganjax.models.age_regressor import AgeRegressor
from ganjax.trainers import age_regressor, common
from ganjax.trainers.common import read_metrics


def smoke_config(data_dir):
    config = regressor_config.get_config("smoke")
    config.data.data_dir = data_dir
    return config


@pytest.fixture(scope="module")
def regressor_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("regressor"))
    main.run(smoke_config(data_dir), workdir)
    return workdir


def hand_mae(params, config, eval_set):
    """|E[age] - age| with the softmax and the expectation written out in NumPy."""
    model = AgeRegressor(num_ages=101, features=tuple(config.model.features), convs_per_stage=1)
    logits = np.asarray(model.apply({"params": params}, eval_set["image"]), np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = probs @ np.arange(101)
    return float(np.mean(np.abs(expected - eval_set["age"])))


def test_regressor_trains_and_its_mae_is_the_hand_computed_one(regressor_run, data_dir):
    config = smoke_config(data_dir)
    metrics = read_metrics(regressor_run)
    assert sorted(s for s, m in metrics.items() if "loss" in m) == [2, 4]
    for key in (
        "loss",
        "cross_entropy",
        "l1",
        "train_mae",
        "grad_norm",
        "learning_rate",
        "eval/mae",
        "eval/cs5",
    ):
        assert np.isfinite(metrics[4][key]), key
    # Warm-up of one step from 0, then cosine decay to 0 over the remaining three.
    assert metrics[2]["learning_rate"] > metrics[4]["learning_rate"] > 0

    judge = age_accuracy.load_regressor(regressor_run)
    assert judge.step == 4 and judge.size == 32
    eval_set = pipeline.load_eval_set(config.data, "test", config.data.eval_examples)
    assert len(eval_set["age"]) == 12  # 4 identities x 3 ages, all of the test split
    expected = hand_mae(jax.device_get(judge.params), config, eval_set)
    np.testing.assert_allclose(metrics[4]["eval/mae"], expected, rtol=1e-5)
    np.testing.assert_allclose(
        np.mean(np.abs(judge.predict(eval_set["image"]) - eval_set["age"])), expected, rtol=1e-5
    )
    # The judge resizes other sizes to its own: a 64 px copy of the faces gives nearly the same ages.
    bigger = np.asarray(jax.image.resize(eval_set["image"], (12, 64, 64, 3), "linear"))
    np.testing.assert_allclose(judge.predict(bigger), judge.predict(eval_set["image"]), atol=1.0)

    # --mode eval writes the same MAE for the latest checkpoint.
    result = main.run(config, regressor_run, mode="eval")
    np.testing.assert_allclose(result["mae"], expected, rtol=1e-5)
    with open(os.path.join(regressor_run, "eval", "4.json")) as f:
        record = json.load(f)
    assert record["trainer"] == "age_regressor" and set(record["metrics"]) == {"raw"}
    np.testing.assert_allclose(record["metrics"]["raw"]["mae"], expected, rtol=1e-5)


def test_age_errors_by_hand():
    errors = age_regressor.age_errors(np.array([10.0, 24.0, 33.0, 50.0]), np.array([12.0, 20.0, 33.0, 60.0]))
    assert errors == {"mae": (2 + 4 + 0 + 10) / 4, "mean_error": (-2 + 4 + 0 - 10) / 4, "cs5": 0.75}


def test_a_non_regressor_workdir_is_refused(tmp_path):
    workdir = tmp_path / "aging_run"
    workdir.mkdir()
    (workdir / common.CONFIG_FILE).write_text(json.dumps({"trainer": "aging"}))
    with pytest.raises(ValueError, match="configs/age_regressor.py"):
        age_accuracy.load_regressor(str(workdir))


def test_bad_config_names_the_key(data_dir):
    config = smoke_config(data_dir)
    config.train.warmup_steps = 10
    with pytest.raises(common.ConfigError, match="train.warmup_steps"):
        age_regressor.validate_config(config)
