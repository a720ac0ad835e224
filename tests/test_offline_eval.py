"""--mode eval (ganjax/evaluation/offline.py) and the metrics it adds: age accuracy with an independent
regressor, dlib identity, a pluggable FCN-score segmenter, FID/KID; eval/<step>.json, results.md, watch mode.

Evaluation only needs checkpoints, so the aging and pix2pix "runs" here are written with each trainer's own
init, config.json and Checkpointer, without training (training is tested in the trainers' own tests); the
age regressor that judges them is trained for its 4 smoke steps.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from PIL import Image

from configs import age_regressor as regressor_config
from configs import aging_utkface, pix2pix_cityscapes
from ganjax import main
from ganjax.data import synthetic_scenes
from ganjax.evaluation import fid, identity, offline, scene_labels, segmentation, translation_offline
from ganjax.models import inception
from ganjax.trainers import aging, common, loop, pix2pix
from ganjax.trainers import translation_common as tc


def aging_config(data_dir, **eval_keys):
    config = aging_utkface.get_config("smoke")
    config.data.data_dir = data_dir
    config.eval.update(eval_keys)
    return config


def checkpoint_writer(config, workdir, setup, init_key):
    """A trainer's fresh state, saved as its checkpoints at any step (plus config.json), as training
    would leave them. Returns save(step)."""
    _, _, *_, init, state_sharding = setup(config, workdir)
    state = jax.jit(init, out_shardings=state_sharding)(init_key)
    if hasattr(state, "ema_params"):
        # The raw generator away from its EMA, so that the two weight sets score differently.
        state = state.replace(g_params=jax.tree.map(lambda p: p * 1.5, state.g_params))
    common.save_run_config(workdir, config)

    def save(step):
        ckpt = loop.open_checkpointer(config, workdir)
        ckpt.save(step, state.replace(step=jnp.asarray(step, jnp.int32)), {})
        ckpt.close()

    return save


@pytest.fixture(scope="module")
def regressor_run(data_dir, tmp_path_factory):
    config = regressor_config.get_config("smoke")
    config.data.data_dir = data_dir  # the aging smoke data: the same prepared dataset
    workdir = str(tmp_path_factory.mktemp("regressor"))
    main.run(config, workdir)
    return workdir


def read_json(path):
    with open(path) as f:
        return json.load(f)


# ---- Aging: raw and EMA, age accuracy, results files, watch mode ----------------------------------------


def test_aging_eval_watches_until_num_steps_with_raw_ema_and_age_accuracy(
    data_dir, regressor_run, tmp_path, monkeypatch
):
    workdir = str(tmp_path / "aging")
    config = aging_config(data_dir, regressor=regressor_run, watch=True, poll_seconds=0.0)
    save = checkpoint_writer(config, workdir, aging._setup, jax.random.key(config.seed))
    save(3)
    polls = []

    def sleep(seconds):  # the "training job" writes its last checkpoint while the watcher waits
        polls.append(seconds)
        if len(polls) > 1:
            raise AssertionError("the watcher kept polling after train.num_steps was evaluated")
        save(6)

    monkeypatch.setattr(offline, "sleep", sleep)
    ema = main.run(config, workdir, mode="eval")
    assert polls == [0.0]
    records = offline.read_results(os.path.join(workdir, "eval"))
    assert [r["step"] for r in records] == [3, 6]
    record = records[-1]
    assert record == read_json(os.path.join(workdir, "eval", "6.json")) and record["trainer"] == "aging"
    assert set(record["metrics"]) == {"ema", "raw"}
    assert ema == pytest.approx(record["metrics"]["ema"])
    assert record["metrics"]["ema"]["gt_l1"] != record["metrics"]["raw"]["gt_l1"]
    for weights in ("ema", "raw"):
        metrics, rows = record["metrics"][weights], record["per_target"][weights]
        judged = {"target_age_mae", "copy_target_age_mae"}
        assert {"age_mae", "gt_l1", "copy_l1", "gt_l1_ratio", "regressor_mae_inputs"} | judged <= set(metrics)
        assert [row["target_age"] for row in rows] == [20.0, 60.0]  # config.eval.target_ages
        for row in rows:
            assert set(row) == {"target_age", "predicted_age_mean", "predicted_age_std"} | judged
        # Every target has the same faces: the overall MAEs are the means of the per-target ones.
        for key in judged:
            assert metrics[key] == pytest.approx(np.mean([r[key] for r in rows])), key
    # The judge's MAE on the unaltered faces is its own test MAE (the same 12 test faces, same order).
    regressor_eval = main.run(common.load_run_config(regressor_run), regressor_run, mode="eval")
    assert record["metrics"]["ema"]["regressor_mae_inputs"] == pytest.approx(regressor_eval["mae"], rel=1e-5)
    assert any("Identity (dlib face recognition) not computed" in note for note in record["notes"])
    assert os.path.exists(os.path.join(workdir, "samples", "eval_0000006.png"))

    table = open(os.path.join(workdir, "eval", offline.RESULTS_MD)).read()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows[:2]] == ["3", "6"]
    assert "ema target_age_mae" in table and "raw target_age_mae" in table
    assert "## Per target age, ema weights, step 6" in table


def fake_checkpoints(workdir, steps):
    """Step folders that look complete (state/_METADATA and data/), for the driver alone."""
    for step in steps:
        step_dir = os.path.join(workdir, "checkpoints", str(step))
        os.makedirs(os.path.join(step_dir, "state"), exist_ok=True)
        os.makedirs(os.path.join(step_dir, "data"), exist_ok=True)
        open(os.path.join(step_dir, "state", "_METADATA"), "w").close()


def test_driver_steps_watch_timeout_and_deleted_checkpoints(tmp_path, monkeypatch):
    """offline.run with a stand-in evaluate_step: which steps it evaluates and when it stops."""
    config = aging_utkface.get_config("smoke")  # train.num_steps = 6
    workdir = str(tmp_path / "run")
    fake_checkpoints(workdir, [2, 4])
    seen = []

    def evaluate_step(step):
        seen.append(step)
        return offline.StepResult(metrics={"raw": {"loss": float(step), "nan": float("nan")}}, notes=["n"])

    def run(**eval_keys):
        config.eval.update(eval_keys)
        return offline.run(config, workdir, evaluate_step, primary="raw")

    assert run(step=-1)["loss"] == 4.0 and seen == [4]  # the latest
    assert run(step=2)["loss"] == 2.0 and seen == [4, 2]
    with pytest.raises(FileNotFoundError, match=r"steps \[2, 4\] only"):
        run(step=3)
    record = read_json(os.path.join(workdir, "eval", "2.json"))
    assert record["metrics"]["raw"] == {"loss": 2.0, "nan": None} and record["notes"] == ["n"]

    # Watch: steps without a result are evaluated; a deleted one is skipped; no new checkpoint -> timeout.
    os.remove(os.path.join(workdir, "eval", "4.json"))
    fake_checkpoints(workdir, [5])

    def evaluate_or_vanish(step):
        if step == 5:
            shutil.rmtree(os.path.join(workdir, "checkpoints", "5"))  # deleted by checkpoint.keep
            raise OSError("gone")
        return evaluate_step(step)

    monkeypatch.setattr(offline, "sleep", lambda s: pytest.fail("no new checkpoint can come"))
    config.eval.update(watch=True, watch_timeout=0.0)
    assert offline.run(config, workdir, evaluate_or_vanish, primary="raw")["loss"] == 4.0
    assert seen == [4, 2, 4]

    # Once a step >= train.num_steps has a result, a watcher evaluates nothing and does not wait.
    fake_checkpoints(workdir, [6])
    config.eval.watch_timeout = 3600.0
    assert offline.run(config, workdir, evaluate_step, primary="raw")["loss"] == 6.0
    assert offline.run(config, workdir, evaluate_step, primary="raw")["loss"] == 6.0
    assert seen == [4, 2, 4, 6]
    table = open(os.path.join(workdir, "eval", offline.RESULTS_MD)).read()
    assert "| step | raw loss | raw nan |" in table and "| 6 | 6 | n/a |" in table


# ---- Identity with dlib's face-recognition ResNet --------------------------------------------------------


@pytest.fixture(scope="module")
def embedder():
    pytest.importorskip("dlib")
    return identity.FaceEmbedder()


def test_identity_of_a_face_with_itself_and_with_a_picture_without_face(embedder):
    face = skimage.data.astronaut()[None]
    same = identity.identity_scores(face, face, embedder)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-9) and same["distance"] == pytest.approx(0.0, abs=1e-9)
    assert same["verification_rate"] == 1.0 and same["verified_of_all"] == 1.0 and same["pairs_scored"] == 1
    # Float [-1, 1] images are rounded back to the same uint8 pixels.
    as_float = face.astype(np.float32) / 127.5 - 1.0
    assert identity.identity_scores(as_float, face, embedder)["distance"] == pytest.approx(0.0, abs=1e-9)

    coffee = np.asarray(Image.fromarray(skimage.data.coffee()).resize((512, 512)))[None]
    other = identity.identity_scores(face, coffee, embedder)
    assert other["outputs_without_face"] == 1 and other["inputs_without_face"] == 0
    assert other["pairs"] == 1 and other["pairs_scored"] == 0 and other["verified_of_all"] == 0.0
    assert np.isnan(other["cosine"]) and np.isnan(other["verification_rate"])


def test_embedder_is_dlibs_compute_face_descriptor(embedder):
    import dlib

    from ganjax import age

    photo = skimage.data.astronaut()
    models = age.face_models_dir()
    rect = dlib.get_frontal_face_detector()(photo, 1)[0]
    shape = dlib.shape_predictor(os.path.join(models, "shape_predictor_5_face_landmarks.dat"))(photo, rect)
    recognizer = dlib.face_recognition_model_v1(os.path.join(models, identity.RECOGNITION_MODEL))
    np.testing.assert_allclose(embedder(photo), np.asarray(recognizer.compute_face_descriptor(photo, shape)))


def test_pair_scores_by_hand():
    a = [np.array([1.0, 0.0]), np.array([0.0, 1.0]), None, np.array([1.0, 0.0])]
    b = [np.array([1.0, 0.0]), np.array([0.6, 0.8]), np.array([1.0, 0.0]), None]
    scores = identity.pair_scores(a, b)
    d2 = np.hypot(0.6, 0.2)  # |(0, 1) - (0.6, 0.8)| = 0.632 > 0.6: not verified
    assert scores["distance"] == pytest.approx((0.0 + d2) / 2)
    assert scores["cosine"] == pytest.approx((1.0 + 0.8) / 2)
    assert scores["verification_rate"] == 0.5 and scores["verified_of_all"] == 0.25
    assert (scores["pairs"], scores["pairs_scored"]) == (4, 2)
    assert (scores["inputs_without_face"], scores["outputs_without_face"]) == (1, 1)


# ---- Segmenters: the interface, tested with the built-in classifier exported as a JAX function ----------


@pytest.fixture(scope="module")
def exported_segmenter(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("segmenter") / "scenes_A_32.jax")
    segmentation.export_segmenter(
        segmentation.scene_segmenter_function("A", 32),
        path,
        height=32,
        width=32,
        num_classes=synthetic_scenes.NUM_CLASSES,
        output="labels",
        platforms=("cpu",),
    )
    return path


def test_exported_builtin_segmenter_matches_the_numpy_one(exported_segmenter):
    labels = np.stack([synthetic_scenes.render_layout(5_000 + k, 32) for k in range(6)])
    photos = np.stack([synthetic_scenes.render_photo(lab, 5_000 + k, "A") for k, lab in enumerate(labels)])
    photos = photos.astype(np.float32) / 127.5 - 1.0
    segmenter = segmentation.load_segmenter(exported_segmenter)
    assert isinstance(segmenter, segmentation.ExportedSegmenter) and segmenter.num_classes == 6
    ours, builtin = segmenter(photos), scene_labels.predict_labels(photos, "A")
    assert np.mean(ours == builtin) > 0.999  # float32 vs float64 features: boundary pixels may flip
    scores = segmentation.score_photos(photos, labels, segmenter)
    reference = scene_labels.label_accuracy(photos, labels, "A")
    for key, value in reference.items():
        assert scores[key] == pytest.approx(value, abs=2e-3), key
    assert scores["pixel_accuracy"] > 0.9
    # Another photo size: resized to the exported 32 x 32 and the labels back to 64 x 64.
    big = np.asarray(jax.image.resize(photos, (6, 64, 64, 3), "linear"))
    assert segmenter(big).shape == (6, 64, 64)


def test_segmentation_scores_by_hand_and_spec_errors():
    labels = np.array([[[0, 0, 1, 255]]])
    predictions = np.array([[[0, 1, 1, 0]]])
    scores = segmentation.segmentation_scores(labels, predictions, num_classes=2)
    # Without the ignored pixel: class 0 has 2 pixels (1 right), class 1 has 1 (right), 1 false positive.
    assert scores == pytest.approx({"pixel_accuracy": 2 / 3, "mean_class_accuracy": 0.75, "mean_iou": 0.5})
    unknown = segmentation.segmentation_scores(labels, np.array([[[0, 7, 1, 0]]]), num_classes=2)
    assert unknown["pixel_accuracy"] == pytest.approx(2 / 3) and unknown["mean_iou"] == pytest.approx(0.75)
    assert isinstance(segmentation.load_segmenter("", "B"), segmentation.BuiltinSceneSegmenter)
    assert segmentation.load_segmenter("", None) is None
    with pytest.raises(FileNotFoundError, match="neither a file"):
        segmentation.load_segmenter("/no/such/segmenter.jax")


def builtin_a():
    """A "module:function" segmenter factory (used through config.eval.segmenter in the test below)."""
    return segmentation.BuiltinSceneSegmenter("A")


# ---- Translation: FID/KID (random Inception), user segmenter, raw weights only --------------------------


def random_inception_variables(path):
    """TEST-ONLY stand-in for pytorch-fid's weights (not downloadable here): He-initialised kernels, unit
    batch-norm statistics. Its numbers are not FIDs; they exercise the same code path."""
    assert path == "test-only-random-inception"
    rng = np.random.default_rng(0)

    def make(key_path, leaf):
        name = key_path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(make, inception.variable_shapes())


def test_pix2pix_eval_adds_fid_kid_and_the_plugged_in_segmenter(
    data_dir, tmp_path, monkeypatch, exported_segmenter
):
    workdir = str(tmp_path / "pix2pix")
    config = pix2pix_cityscapes.get_config("smoke")
    config.data.data_dir = data_dir
    checkpoint_writer(config, workdir, pix2pix._setup, tc.init_key(config.seed))(4)
    _, mesh, *_ = pix2pix._setup(config, workdir)
    skipped = translation_offline.TranslationExtras(config, mesh, 8, ("AtoB",))
    assert skipped.notes[0].startswith("FID/KID skipped: config.eval.inception_weights is empty")

    monkeypatch.setattr(translation_offline, "load_inception_variables", random_inception_variables)
    config.eval.inception_weights = "test-only-random-inception"
    config.eval.segmenter = exported_segmenter
    result = main.run(config, workdir, mode="eval")
    record = read_json(os.path.join(workdir, "eval", "4.json"))
    assert set(record["metrics"]) == {"raw"} and record["metrics"]["raw"] == pytest.approx(result)
    assert record["notes"] == []
    for key in ("fid", "kid_mean", "kid_std"):
        assert np.isfinite(result[key]), key
    # The exported built-in classifier scores what the in-loop built-in one scores (all 4 test images).
    for key in ("pixel_accuracy", "mean_class_accuracy", "mean_iou"):
        assert result[f"fcn_{key}"] == pytest.approx(result[key], abs=1e-3), key

    # FID/KID are the test-vs-test protocol of ganjax.evaluation.fid (here with cheap stand-in features).
    config.eval.inception_weights = ""  # the segmenter alone makes it load the test sets
    extras = translation_offline.TranslationExtras(config, mesh, 8, ("AtoB",))
    extras.features = lambda images, name="": np.asarray(images, np.float32).reshape(len(images), -1)[:, ::37]
    outputs = np.random.default_rng(1).uniform(-1, 1, extras.tests["AtoB"].inputs.shape).astype(np.float32)
    ours = extras.metrics(lambda test: outputs)["AtoB"]
    reference = fid.protocol_test_vs_test(extras.features, extras.reals["AtoB"], outputs)
    for key in ("fid", "kid_mean", "kid_std"):
        assert ours[key] == pytest.approx(reference[key], rel=1e-9), key

    # A "module:function" segmenter factory is the other way to plug one in.
    segmenter = segmentation.load_segmenter("tests.test_offline_eval:builtin_a")
    assert isinstance(segmenter, segmentation.BuiltinSceneSegmenter) and segmenter.style == "A"
