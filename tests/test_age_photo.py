"""ganjax.age on a real photo (scikit-image's astronaut, Eileen Collins) with a 2-step aging smoke run.

Needs the [faces] extra (dlib-bin, face-recognition-models) and scikit-image; skipped without them.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import aging_utkface
from ganjax import age, main, translate, visualize
from ganjax.trainers import aging, common

dlib = pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")
if importlib.util.find_spec("face_recognition_models") is None:
    pytest.skip("face-recognition-models is not installed", allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGES = (10.0, 30.0, 50.0, 70.0)
SIZE = 32  # the smoke config's data.size


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = aging_utkface.get_config("smoke")
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    config.mesh.axes = (("data", 1),)
    config.train.num_steps = 2
    config.checkpoint.every_steps = config.log.every_steps = config.log.sample_every_steps = 2
    config.eval.every_steps = 2
    workdir = str(tmp_path_factory.mktemp("runs") / "aging")
    main.run(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder: the astronaut (JPEG, in a subfolder), a noise picture without a face, a text file."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "people").mkdir()
    Image.fromarray(skimage_data.astronaut()).save(folder / "people" / "astronaut.jpg", quality=95)
    noise = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    (folder / "readme.png").write_text("not a picture")
    return folder


def cell(strip, column):
    """The column-th picture of a one-row progression strip (header 14 px, padding 2)."""
    top, left = 14 + 2, 2 + column * (SIZE + 2)
    return strip[top : top + SIZE, left : left + SIZE]


def test_aligned_faces_are_upright_and_centred():
    aligner = age.FaceAligner(128)
    faces = aligner(skimage_data.astronaut())
    assert len(faces) == 1  # the mission patch scores ~0.1, under min_score 0.5
    chip = faces[0].chip
    assert chip.shape == (128, 128, 3) and chip.dtype == np.uint8
    # Landmarks found again in the aligned chip: eyes level and centred.
    predictor = dlib.shape_predictor(
        os.path.join(age.face_models_dir(), "shape_predictor_5_face_landmarks.dat")
    )
    (box,) = dlib.get_frontal_face_detector()(chip, 1)
    points = np.array([(p.x, p.y) for p in predictor(chip, box).parts()], float)
    eye_1, eye_2 = points[0:2].mean(0), points[2:4].mean(0)
    assert abs(eye_1[1] - eye_2[1]) <= 2
    assert abs((eye_1[0] + eye_2[0]) / 2 - 64) <= 4
    assert 20 <= abs(eye_1[0] - eye_2[0]) <= 50  # the face fills about 1 / 1.8 of the crop

    both = age.FaceAligner(128, min_score=0.0)(skimage_data.astronaut())
    assert len(both) == 2 and both[0].box[0] < both[1].box[0]  # numbered left to right


def test_folder_gives_one_strip_per_face_with_the_model_outputs(run, photos, tmp_path):
    model_run = age.load_aging_generator(run)
    assert (model_run.step, model_run.size) == (2, SIZE)
    summary = age.age_photos(model_run, str(photos), str(tmp_path / "out"), ",".join(map(str, AGES)))
    assert summary.written == [str(tmp_path / "out" / "people" / "astronaut_face1.png")]
    assert summary.no_face == ["noise.png"]
    assert summary.skipped == [("readme.png", "not an image")]

    strip = np.asarray(Image.open(summary.written[0]))
    assert strip.shape == (14 + SIZE + 4, (1 + len(AGES)) * (SIZE + 2) + 2, 3)
    photo = np.asarray(Image.open(photos / "people" / "astronaut.jpg").convert("RGB"))
    (face,) = age.FaceAligner(SIZE)(photo)
    np.testing.assert_array_equal(cell(strip, 0), face.chip)

    # The aged columns are the EMA generator's outputs, read from the full checkpoint.
    config = common.load_run_config(run)
    model, _ = aging.build_models(config)
    params = ocp.PyTreeCheckpointer().restore(os.path.join(run, "checkpoints", "2", "state"))["ema_params"]
    images = np.repeat((face.chip.astype(np.float32) / 127.5 - 1.0)[None], len(AGES), axis=0)
    out = model.apply({"params": params}, images, np.asarray(AGES, np.float32))
    want = visualize.to_uint8(out["images"])
    for k in range(len(AGES)):
        assert np.abs(cell(strip, k + 1).astype(int) - want[k].astype(int)).max() <= 1
    assert summary.estimated == pytest.approx([float(out["estimated_age"][0])], abs=1e-4)


def test_command_line_on_one_photo(run, photos, tmp_path):
    photo = str(photos / "people" / "astronaut.jpg")
    args = ["--workdir", run, "--input", photo, "--ages", "20,60", "--output", str(tmp_path / "cli")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "ganjax.age", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Wrote 1 face strips" in done.stdout
    strip = np.asarray(Image.open(tmp_path / "cli" / "astronaut_face1.png"))
    assert strip.shape == (14 + SIZE + 4, 3 * (SIZE + 2) + 2, 3)


def test_bad_inputs_say_what_is_wrong(run, photos, tmp_path):
    model_run = age.load_aging_generator(run)
    out = str(tmp_path / "out")
    with pytest.raises(translate.UsageError, match=r"outside \[0, 100\]"):
        age.age_photos(model_run, str(photos), out, "10,130")
    with pytest.raises(translate.UsageError, match="not a comma-separated list"):
        age.age_photos(model_run, str(photos), out, "ten")
    with pytest.raises(translate.UsageError, match="--ages is empty"):
        age.age_photos(model_run, str(photos), out, " ")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        age.age_photos(model_run, str(tmp_path / "nope.jpg"), out, "10")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no files"):
        age.age_photos(model_run, str(tmp_path / "empty"), out, "10")
    with pytest.raises(translate.UsageError, match="crops 64 px faces; the model takes 32"):
        age.age_photos(model_run, str(photos), out, "10", aligner=age.FaceAligner(64))
    with pytest.raises(translate.UsageError, match="--padding -1"):
        age.FaceAligner(SIZE, padding=-1)

    other = tmp_path / "translation_run"
    other.mkdir()
    (other / common.CONFIG_FILE).write_text(json.dumps({"trainer": "pix2pix"}))
    with pytest.raises(translate.UsageError, match="'pix2pix' run; aging needs"):
        age.load_aging_generator(str(other))
