"""UTKFace as a TFDS builder over a local folder of the original files (nothing is downloaded).

UTKFace (Zhang, Song and Qi, CVPR 2017) has no official split and is not in the TFDS catalog. Its
files are named `[age]_[gender]_[race]_[date&time].jpg` (the in-the-wild set, any size) or
`....jpg.chip.jpg` (the aligned-and-cropped set, 200 x 200). A few names lack a field, a few files
are duplicates; the builder keeps what it can use and counts every file it skips, with a reason.

Each kept image is converted to RGB (greyscale, RGBA, palette and 16-bit inputs included), centre
cropped to a square and resized to `stored_size` (large JPEGs are decoded at a reduced scale first);
images over PIL's decompression-bomb limit are skipped as `too_large`. The train/test split is a hash
of the file name, so it never changes when files are added or removed. The skip report is written as
JSON next to the records (`prepare_report.json`), returned by `ganjax.data.prepare.prepare` and logged
when training starts.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import os
import re
import time
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps, UnidentifiedImageError

from ganjax.data.synthetic_faces import ordered_map, write_report

MAX_AGE = 116  # the oldest age in UTKFace; anything outside 0..116 is a labelling error
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DOWNLOAD_INSTRUCTIONS = """\
UTKFace is not downloaded automatically. Get the "Aligned&Cropped Faces" archive UTKFace.tar.gz
(about 100 MB, 23,708 images named [age]_[gender]_[race]_[date&time].jpg.chip.jpg) from the
dataset authors' page https://susanqq.github.io/UTKFace/ , unpack it with
    tar -xzf UTKFace.tar.gz
and pass the unpacked folder as manual_dir (config.data.manual_dir, or --manual_dir for
`python -m ganjax.data.prepare`). The in-the-wild set (*.jpg, any size) works as well."""

# Skip reasons, in the order the checks run.
MALFORMED_NAME = "malformed_name"
AGE_OUT_OF_RANGE = "age_out_of_range"
EMPTY_FILE = "empty_file"
DUPLICATE = "duplicate"
NOT_AN_IMAGE = "not_an_image"
CORRUPT_IMAGE = "corrupt_or_truncated_image"
TOO_LARGE = "too_large"  # over PIL's decompression-bomb limit (~179 megapixels)
OTHER_FILE = "not_an_image_extension"
_EXAMPLES_PER_REASON = 5


class UTKFaceLabels(NamedTuple):
    age: int
    gender: int  # 0 male, 1 female, -1 missing
    race: int  # 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others, -1 missing


def _is_timestamp(field: str) -> bool:
    return len(field) >= 8 and field.isdigit()  # yyyymmddHHMMSSfff, sometimes shorter


def parse_utkface_filename(name: str) -> UTKFaceLabels:
    """Labels from a UTKFace file name (a path is fine); raises ValueError(reason) if unusable.

    `25_0_2_20170116174525125.jpg.chip.jpg` -> (25, 0, 2). Names that lack a field, such as
    `61_1_20170109150557335.jpg.chip.jpg`, get -1 for the missing gender/race; so does a gender or
    race field that is present but not a valid code. The age must parse.
    """
    base = os.path.basename(name).strip()
    stem = base.split(".", 1)[0]
    fields = [f.strip() for f in stem.split("_")]
    if len(fields) < 2:
        raise ValueError(f"expected [age]_[gender]_[race]_[date&time], got {base!r}")
    if _is_timestamp(fields[-1]):
        fields = fields[:-1]
    if len(fields) > 3:
        raise ValueError(f"too many fields in {base!r}")
    if not re.fullmatch(r"[+-]?\d+", fields[0]):  # a negative age parses; the range check skips it
        raise ValueError(f"age field {fields[0]!r} is not an integer in {base!r}")

    def code(i: int, valid: range) -> int:
        if i >= len(fields) or not fields[i].isdigit() or int(fields[i]) not in valid:
            return -1
        return int(fields[i])

    return UTKFaceLabels(age=int(fields[0]), gender=code(1, range(2)), race=code(2, range(5)))


def check_manual_dir(manual_dir: str | os.PathLike) -> str:
    """Returns the expanded folder path; FileNotFoundError (saying what to download) if unusable."""
    path = os.path.expanduser(os.fspath(manual_dir)) if manual_dir else ""
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"UTKFace folder {path!r} does not exist.\n{DOWNLOAD_INSTRUCTIONS}")
    if not any(_list_files(path, images_only=True)):
        archives = [f for f in os.listdir(path) if f.endswith((".tar.gz", ".tgz", ".zip"))]
        hint = f" It holds {archives}: unpack them there first." if archives else ""
        raise FileNotFoundError(
            f"UTKFace folder {path!r} contains no .jpg/.png files.{hint}\n{DOWNLOAD_INSTRUCTIONS}"
        )
    return path


def _list_files(root: str, images_only: bool = False):
    """Relative paths of the files under root (recursive; hidden folders skipped), unsorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not images_only or f.lower().endswith(IMAGE_EXTENSIONS):
                yield os.path.relpath(os.path.join(dirpath, f), root)


def is_test_file(filename: str, test_percent: float) -> bool:
    """Deterministic split: a stable hash of the base name, so it never depends on other files."""
    digest = hashlib.sha256(os.path.basename(filename).encode()).digest()
    return int.from_bytes(digest[:8], "little") % 10_000 < test_percent * 100


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; 16-bit scaled (not clipped), transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        scale = 1.0 if image.mode == "F" else 1.0 / 257.0  # 0..65535 -> 0..255
        grey = np.clip(np.round(np.asarray(image, np.float64) * scale), 0, 255).astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def load_face(path: str, size: int) -> Image.Image:
    """Decodes, converts to RGB, centre-crops to a square and resizes to (size, size).

    Raises UnidentifiedImageError for non-images and OSError/ValueError/... for corrupt ones.
    """
    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEG: decode large photos at a reduced scale >= size
        image = ImageOps.exif_transpose(image)  # loads the pixels; truncated files raise here
        image.load()
    image = _to_rgb(image)
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return image


def _encode_face(job: tuple[str, str, int]) -> tuple[str, str | None, bytes | str]:
    """(rel path, abs path, size) -> (rel path, None, JPEG bytes) or (rel path, reason, detail)."""
    rel, path, size = job
    try:
        image = load_face(path, size)
    except UnidentifiedImageError:
        return rel, NOT_AN_IMAGE, "not a decodable image"
    except Image.DecompressionBombError as e:  # decoding it could exhaust memory
        return rel, TOO_LARGE, str(e)
    except Exception as e:  # noqa: BLE001 -- any decoder failure means skip and count this file
        return rel, CORRUPT_IMAGE, f"{type(e).__name__}: {e}"
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return rel, None, buf.getvalue()


class _SkipCounter:
    """Per-reason counts and a few example file names, for the prepare report."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, reason: str, filename: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < _EXAMPLES_PER_REASON:
            self.examples[reason].append(f"{filename} ({detail})" if detail else filename)


@dataclasses.dataclass(eq=False)
class UTKFaceConfig(tfds.core.BuilderConfig):
    """stored_size: side of the stored square images; test_percent: share of files in test."""

    name: str = ""
    stored_size: int = 128
    test_percent: float = 10.0

    def __post_init__(self):
        if self.stored_size < 8 or not 0 <= self.test_percent <= 100:
            raise ValueError(f"Invalid UTKFace config: {self}")
        if not self.name:
            self.name = f"s{self.stored_size}_t{self.test_percent:g}"


class UTKFace(tfds.core.GeneratorBasedBuilder):
    """UTKFace faces with age, gender and race labels, from a local manual folder.

    Construct with `UTKFace(config=UTKFaceConfig(...), data_dir=..., file_format="array_record")`
    and prepare with `download_and_prepare(download_config=tfds.download.DownloadConfig(
    manual_dir=FOLDER))`. Records: image (S, S, 3) uint8, age float32, gender/race int64 (-1 when
    the name lacks them), filename (the original base name; reads back as bytes), index int64 (rank
    of the file name among the split's kept files, so sorting by index gives file-name order).
    """

    name = "utkface"  # TFDS would derive "utk_face" from the class name
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.stored_size
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="jpeg"),
                    "age": tfds.features.Scalar(np.float32),
                    "gender": tfds.features.Scalar(np.int64),
                    "race": tfds.features.Scalar(np.int64),
                    "filename": tfds.features.Text(),
                    "index": tfds.features.Scalar(np.int64),
                }
            ),
            homepage="https://susanqq.github.io/UTKFace/",
        )

    def _split_generators(self, dl_manager):
        try:
            root = os.fspath(dl_manager.manual_dir)
        except AssertionError as e:  # TFDS: missing or empty folder
            raise FileNotFoundError(f"{e}") from None
        root = check_manual_dir(root)
        self._root, self._skips = root, _SkipCounter()
        self._kept = {"train": 0, "test": 0}
        splits = self._select_files(root)
        if not all(splits.values()):  # TFDS cannot write an empty split
            raise ValueError(
                f"UTKFace in {root}: {len(splits['train'])} train and {len(splits['test'])} test "
                f"files left after the name checks (test_percent="
                f"{self.builder_config.test_percent:g}); both splits need at least one. Skipped: "
                f"{dict(self._skips.counts)}."
            )
        return {split: self._generate_examples(split, files) for split, files in splits.items()}

    def _select_files(self, root: str) -> dict[str, list[tuple[str, UTKFaceLabels]]]:
        """The cheap checks (name, age, empty, duplicate), in sorted order; decoding comes later."""
        seen: dict[str, str] = {}  # content hash -> first file with it
        splits: dict[str, list] = {"train": [], "test": []}
        for rel in sorted(_list_files(root)):
            base = os.path.basename(rel)
            if not base.lower().endswith(IMAGE_EXTENSIONS):
                self._skips.add(OTHER_FILE, rel)
                continue
            try:
                labels = parse_utkface_filename(base)
            except ValueError as e:
                self._skips.add(MALFORMED_NAME, rel, str(e))
                continue
            if not 0 <= labels.age <= MAX_AGE:
                self._skips.add(AGE_OUT_OF_RANGE, rel, f"age {labels.age}")
                continue
            with open(os.path.join(root, rel), "rb") as f:
                content = f.read()
            if not content:
                self._skips.add(EMPTY_FILE, rel)
                continue
            digest = hashlib.sha256(content).hexdigest()
            if digest in seen:
                self._skips.add(DUPLICATE, rel, f"same content as {seen[digest]}")
                continue
            seen[digest] = rel
            split = "test" if is_test_file(base, self.builder_config.test_percent) else "train"
            splits[split].append((rel, labels))
        return splits

    def _generate_examples(self, split: str, files: list[tuple[str, UTKFaceLabels]]):
        size = self.builder_config.stored_size
        labels = dict(files)
        jobs = [(rel, os.path.join(self._root, rel), size) for rel, _ in files]
        for rel, reason, payload in ordered_map(_encode_face, jobs):
            if reason is not None:
                self._skips.add(reason, rel, payload)
                continue
            index = self._kept[split]  # rank among the kept files: no gaps for skipped ones
            self._kept[split] += 1
            yield (
                rel,
                {
                    "image": payload,
                    "age": float(labels[rel].age),
                    "gender": labels[rel].gender,
                    "race": labels[rel].race,
                    "filename": os.path.basename(rel),
                    "index": index,
                },
            )
        if self._kept[split] == 0:  # TFDS cannot write an empty split; say why it is empty
            raise ValueError(
                f"UTKFace in {self._root}: none of the {len(files)} {split} files decodes as an image. "
                f"Skipped: {dict(self._skips.counts)}, e.g. {dict(self._skips.examples)}."
            )

    def _download_and_prepare(self, dl_manager, download_config):
        start = time.perf_counter()
        super()._download_and_prepare(dl_manager, download_config)
        write_report(
            self.data_dir,  # the temporary build directory while preparing; renamed on success
            {
                "dataset": "utkface",
                "config": self.builder_config.name,
                "manual_dir": self._root,
                "kept": dict(self._kept),
                "skipped": dict(sorted(self._skips.counts.items())),
                "skipped_examples": dict(sorted(self._skips.examples.items())),
                "build_seconds": round(time.perf_counter() - start, 2),
            },
        )
