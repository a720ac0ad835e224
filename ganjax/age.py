"""Age the faces in photos with the EMA generator of an aging run: detect, align, age, write strips.

  python -m ganjax.age --workdir runs/utk --input photo.jpg|DIR --ages 10,30,50,70 --output out/ \
      [--padding 0.4] [--upsample 1] [--min_score 0.5] [--step N]

For every photo (a file, or every non-hidden file under a folder, recursively) each face that dlib's HOG
detector finds with a score >= --min_score is aligned on its 5 landmarks (eye corners and nose) by
`dlib.get_face_chip`: rotated upright, scaled and cropped to the model's square input (config.data.size)
with --padding of margin around the landmarks' face box on every side. The aligned face and its
versions at each target age (the current age is the model's own estimate) are written as one strip,
OUT/<photo's relative path without extension>_face<k>.png (faces numbered left to right from 1), uint8
of (14 + S + 4, (1 + A) * (S + 2) + 2, 3) for A ages and model size S (`visualize.progression_grid`).

Alignment: UTKFace's aligned-and-cropped faces (the training data of configs/aging_utkface.py) are
upright, centred faces with the whole head and some background; dlib's face chip with padding 0.4
frames a face about that way (the landmarks' box is 1 / 1.8 of the crop). The value was chosen by eye,
not measured on UTKFace: raise it for looser crops, lower it for tighter ones.

Needs the [faces] extra: dlib-bin and face-recognition-models (dlib's detector and landmark models, no
download at run time). Photos without a face and files that are not images are reported at the end.

The restore of an aging run's generator (`load_aging_generator`) is shared with ganjax.export.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image, ImageOps

from ganjax import translate, visualize
from ganjax.checkpoint import CheckpointShapeError

# config.trainer -> key path of the generator parameters to use: the EMA generator, which the trainer
# evaluates and samples from.
AGING_FIELDS = {"aging": ("ema_params",)}

# ---- The aging generator of a run ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AgingRun:
    """The restored generator of an aging run: `model.apply({"params": params}, images, target_ages)`.

    size: the model's square input size (config.data.size); factor: input sizes must be multiples of it.
    """

    workdir: str
    config: Any
    step: int
    model: Any
    params: Any
    size: int
    factor: int

    @property
    def max_age(self) -> float:
        return float(self.model.num_ages - 1)

    def make_apply(self) -> Callable[[jax.Array, jax.Array], dict]:
        """(images float32 (B, H, W, 3) in [-1, 1], target_ages float32 (B,)) -> the model's output dict
        (`images` (B, H, W, 3) aged, `estimated_age` (B,), ...); the current age is the estimate."""
        model, params = self.model, self.params

        def apply(images, target_ages):
            return model.apply({"params": params}, images, target_ages)

        return apply


def load_aging_generator(workdir: str, step: int | None = None) -> AgingRun:
    """Rebuilds the generator from WORKDIR/config.json and reads only its EMA parameters."""
    from ganjax.trainers import aging  # the trainer module holds build_models

    workdir, config = translate.load_config(workdir)
    if config.trainer not in AGING_FIELDS:
        raise translate.UsageError(
            f"{workdir} is a {config.trainer!r} run; aging needs one of the trainers {tuple(AGING_FIELDS)}."
        )
    model, _ = aging.build_models(config)
    size = int(config.data.size)
    step, step_dir = translate.find_checkpoint(workdir, step)
    shapes = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jnp.zeros((1, size, size, 3), jnp.float32),
        jnp.zeros((1,), jnp.float32),
    )
    path = AGING_FIELDS[config.trainer]
    params = translate.restore_fields(step_dir, {path: translate.abstract_on_one_device(shapes["params"])})
    logging.info("Restored %s of %s at step %d.", "/".join(path), workdir, step)
    return AgingRun(workdir, config, step, model, params[path], size, 2**model.num_downsamples)


def parse_ages(text: str | Sequence[float], max_age: float) -> list[float]:
    """--ages "10,30,50,70" -> [10.0, 30.0, 50.0, 70.0], each in [0, max_age]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        ages = [float(a) for a in items if str(a).strip()]
    except ValueError:
        raise translate.UsageError(f"--ages {text!r} is not a comma-separated list of ages.") from None
    if not ages:
        raise translate.UsageError("--ages is empty; give target ages such as 10,30,50,70.")
    bad = [a for a in ages if not 0 <= a <= max_age]
    if bad:
        raise translate.UsageError(f"--ages {bad} outside [0, {max_age:g}] (the model's age range).")
    return ages


# ---- Faces -----------------------------------------------------------------------------------------


def face_models_dir() -> str:
    """The folder of face-recognition-models' .dat files, found without importing the package (its
    __init__ needs pkg_resources, which current setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(_MISSING_FACES)
    return os.path.join(spec.submodule_search_locations[0], "models")


_MISSING_FACES = (
    "ganjax.age needs dlib and its models: pip install 'ganjax[faces]' (dlib-bin, face-recognition-models)."
)


@dataclasses.dataclass(frozen=True)
class Face:
    """One detected face: box (left, top, right, bottom) in the photo, detector score, aligned chip uint8
    (S, S, 3)."""

    box: tuple[int, int, int, int]
    score: float
    chip: np.ndarray


class FaceAligner:
    """dlib HOG face detector + 5-landmark predictor + `get_face_chip` (see the module docstring)."""

    def __init__(self, size: int, *, padding: float = 0.4, upsample: int = 1, min_score: float = 0.5):
        try:
            import dlib
        except ImportError:
            raise ModuleNotFoundError(_MISSING_FACES) from None
        if padding < 0:
            raise translate.UsageError(f"--padding {padding} must be >= 0.")
        if upsample < 0:
            raise translate.UsageError(f"--upsample {upsample} must be >= 0.")
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(
            os.path.join(face_models_dir(), "shape_predictor_5_face_landmarks.dat")
        )
        self.size, self.padding, self.upsample, self.min_score = size, padding, upsample, min_score

    def __call__(self, photo: np.ndarray) -> list[Face]:
        """Faces in a uint8 (H, W, 3) RGB photo, left to right."""
        photo = np.ascontiguousarray(photo)
        # A negative adjust_threshold returns weak detections too; --min_score then decides.
        rects, scores, _ = self._detector.run(photo, self.upsample, min(self.min_score, 0.0))
        faces = []
        for rect, score in zip(rects, scores, strict=True):
            if score < self.min_score:
                continue
            shape = self._landmarks(photo, rect)
            chip = self._dlib.get_face_chip(photo, shape, size=self.size, padding=self.padding)
            faces.append(Face((rect.left(), rect.top(), rect.right(), rect.bottom()), float(score), chip))
        return sorted(faces, key=lambda f: f.box[0])


# ---- Photos -> strips -------------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
    """written: strip paths; estimated: per strip, the model's estimate of the input face's age;
    no_face: photos without a face; skipped: (path, reason) of files that are not readable images."""

    written: list[str] = dataclasses.field(default_factory=list)
    estimated: list[float] = dataclasses.field(default_factory=list)
    no_face: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def message(self, output_dir: str) -> str:
        text = f"Wrote {len(self.written)} face strips to {output_dir}."
        if self.no_face:
            text += f" No face found in {len(self.no_face)} photos: {', '.join(self.no_face[:10])}."
        if self.skipped:
            names = ", ".join(f"{p} ({why})" for p, why in self.skipped[:10])
            text += f" Skipped {len(self.skipped)} files that are not readable images: {names}."
        return text


def read_photo(path: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB with the EXIF orientation applied."""
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def age_photos(
    run: AgingRun,
    input_path: str,
    output_dir: str,
    ages: Sequence[float],
    *,
    aligner: FaceAligner | None = None,
) -> Summary:
    """Writes one strip per detected face of every photo at `input_path` (file or folder)."""
    input_path = os.path.abspath(os.path.expanduser(input_path))
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    ages = parse_ages(ages, run.max_age)
    if os.path.isfile(input_path):
        root, relative = os.path.dirname(input_path), [os.path.basename(input_path)]
    elif os.path.isdir(input_path):
        root, relative = input_path, translate.list_inputs(input_path, exclude=output_dir)
        if not relative:
            raise FileNotFoundError(f"--input {input_path} holds no files.")
    else:
        raise FileNotFoundError(f"--input {input_path} does not exist.")
    aligner = aligner or FaceAligner(run.size)
    if aligner.size != run.size:
        raise translate.UsageError(f"the aligner crops {aligner.size} px faces; the model takes {run.size}.")

    apply = jax.jit(run.make_apply())
    targets = np.asarray(ages, np.float32)
    summary = Summary()
    for rel in relative:
        try:
            photo = read_photo(os.path.join(root, rel))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            summary.skipped.append((rel, translate.skip_reason(e)))
            continue
        faces = aligner(photo)
        if not faces:
            summary.no_face.append(rel)
        for k, face in enumerate(faces, start=1):
            # One call per face: the face repeated once per target age.
            images = np.repeat((face.chip.astype(np.float32) / 127.5 - 1.0)[None], len(ages), axis=0)
            out = apply(images, targets)
            estimated = float(out["estimated_age"][0])
            strip = visualize.progression_grid(images[:1], np.asarray(out["images"])[None], ages)
            path = os.path.join(output_dir, f"{os.path.splitext(rel)[0]}_face{k}.png")
            summary.written.append(visualize.save_png(strip, path))
            summary.estimated.append(estimated)
            logging.info(
                "%s face %d (score %.2f): estimated age %.1f -> %s", rel, k, face.score, estimated, path
            )
    logging.info(summary.message(output_dir))
    return summary


# ---- Command line ------------------------------------------------------------------------------------


def _cli() -> None:
    # Flags are defined here, not at import: ganjax.main, translate and export define --workdir too.
    from absl import app, flags

    workdir = flags.DEFINE_string("workdir", None, "Workdir of an aging run (e.g. runs/utk).")
    input_path = flags.DEFINE_string("input", None, "A photo, or a folder of photos (searched recursively).")
    output_dir = flags.DEFINE_string("output", None, "Folder for the strips, one PNG per face.")
    ages = flags.DEFINE_string("ages", "10,30,50,70", "Comma-separated target ages in years.")
    padding = flags.DEFINE_float("padding", 0.4, "Margin around the face, as dlib.get_face_chip's padding.")
    upsample = flags.DEFINE_integer("upsample", 1, "Times the detector upsamples the photo (small faces).")
    min_score = flags.DEFINE_float("min_score", 0.5, "Smallest HOG detector score kept as a face.")
    step = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
    flags.mark_flags_as_required(["workdir", "input", "output"])

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        logging.set_verbosity(logging.INFO)
        try:
            run = load_aging_generator(workdir.value, step.value)
            aligner = FaceAligner(
                run.size, padding=padding.value, upsample=upsample.value, min_score=min_score.value
            )
            summary = age_photos(run, input_path.value, output_dir.value, ages.value, aligner=aligner)
        except (FileNotFoundError, ModuleNotFoundError, translate.UsageError, CheckpointShapeError) as e:
            raise SystemExit(f"ganjax.age: {e}") from None
        print(summary.message(os.path.abspath(output_dir.value)))

    app.run(main)


if __name__ == "__main__":
    _cli()
