"""TFDS builders over the folder layouts of junyanz/pytorch-CycleGAN-and-pix2pix, and `prepare_translation`.

Nothing is downloaded here: the datasets are folders that the reference's download scripts unpack.

- `UnalignedFolders` (`unaligned_folders`, the CycleGAN sets horse2zebra, summer2winter_yosemite,
  apple2orange, tiger2leopard in the same layout, ...): `ROOT/trainA, trainB, testA, testB`. One TFDS
  split per folder (`trainA`, `trainB`, `testA`, `testB`), so domain A and domain B are read, shuffled
  and sampled independently, as the reference's unaligned dataset does.
- `AlignedFolders` (`aligned_folders`, the pix2pix sets cityscapes, facades, edges2shoes, maps, ...):
  `ROOT/train, val, test` (whichever exist; train and one of val/test are required) holding
  side-by-side AB images; A is the left half and B the right half (`w // 2`, as the reference).

Preprocessing at build time follows the reference's `--preprocess resize_and_crop`: every image (each
half for AB images) is converted to RGB and resized to `load_size` x `load_size` with PIL bicubic
(exactly `transforms.Resize([load_size, load_size], BICUBIC)` on a PIL image); the random crop to
`crop_size` and the flip happen in the input pipeline (`ganjax.data.translation_pipeline`). Images
are stored as PNG (lossless: no second generation of JPEG artifacts).

Files are walked recursively in sorted order, as the reference's `make_dataset`. Zero-byte files,
files without an image extension, undecodable or truncated images, images over PIL's decompression-bomb
limit (~179 megapixels) and byte-identical copies of a file earlier in the same split are skipped and
counted with a reason; greyscale, RGBA, palette, CMYK and 16-bit images are converted to RGB and counted
by mode; large images are resized like any other. A split left with no usable image stops the build
with an error naming the reasons. The report is written as JSON next to the records
(`prepare_report.json`), returned by `prepare_translation` and logged when training starts. Records are
stored in file-name order (`disable_shuffling`): record i of a split has `index` i, the rank of its file
among the split's kept files.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import re
import time

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from ganjax.data.synthetic_faces import REPORT_FILENAME, ordered_map, write_report
from ganjax.data.synthetic_scenes import SyntheticScenes, SyntheticScenesConfig

TRANSLATION_DATASETS = ("synthetic_scenes", "unaligned_folders", "aligned_folders")
# The reference's IMG_EXTENSIONS (data/image_folder.py), compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp")
UNALIGNED_SPLITS = ("trainA", "trainB", "testA", "testB")
ALIGNED_SPLITS = ("train", "val", "test")

# Datasets the reference's scripts download (datasets/download_{cyclegan,pix2pix}_dataset.sh).
CYCLEGAN_DATASETS = (
    "apple2orange", "summer2winter_yosemite", "horse2zebra", "monet2photo", "cezanne2photo", "ukiyoe2photo",
    "vangogh2photo", "maps", "cityscapes", "facades", "iphone2dslr_flower", "ae_photos",
)  # fmt: skip
PIX2PIX_DATASETS = ("cityscapes", "night2day", "edges2handbags", "edges2shoes", "facades", "maps")
REFERENCE_REPO = "github.com/junyanz/pytorch-CycleGAN-and-pix2pix"
CYCLEGAN_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/datasets/{name}.zip"
PIX2PIX_URL = "http://efrosgans.eecs.berkeley.edu/pix2pix/datasets/{name}.tar.gz"

# Skip reasons (the same names as the UTKFace builder's where they mean the same).
EMPTY_FILE = "empty_file"
OTHER_FILE = "not_an_image_extension"
NOT_AN_IMAGE = "not_an_image"
CORRUPT_IMAGE = "corrupt_or_truncated_image"
TOO_LARGE = "too_large"
DUPLICATE = "duplicate"
TOO_NARROW = "too_narrow_for_ab_split"
_EXAMPLES_PER_REASON = 5


# ---------------------------------------------------------------------------------------------
# Locating the folders, and what to download when they are missing.
# ---------------------------------------------------------------------------------------------


def download_instructions(layout: str, dataset: str) -> str:
    """How to get `dataset` in the `layout` ("unaligned" or "aligned") folder structure."""
    if layout == "unaligned":
        folders = "trainA/ trainB/ testA/ testB/"
        if dataset in CYCLEGAN_DATASETS:
            how = (
                f"Download it with the reference's script ({REFERENCE_REPO}):\n"
                f"    bash ./datasets/download_cyclegan_dataset.sh {dataset}\n"
                f"i.e. fetch {CYCLEGAN_URL.format(name=dataset)} (the CycleGAN datasets page) and unzip it."
            )
        else:
            how = (
                f"{dataset!r} is not one of the CycleGAN download script's datasets {CYCLEGAN_DATASETS}; "
                f"arrange its images in the same layout (e.g. tiger2leopard: tigers in trainA/testA, "
                f"leopards in trainB/testB)."
            )
    else:
        folders = "train/ and val/ and/or test/ (side-by-side AB images)"
        if dataset == "cityscapes":
            how = (
                f"Use the pix2pix version cityscapes.tar.gz from the pix2pix datasets page "
                f"({PIX2PIX_URL.format(name='cityscapes')}) and untar it. The reference's "
                f"download_pix2pix_dataset.sh no longer serves it for licence reasons: alternatively "
                f"register at https://www.cityscapes-dataset.com, download gtFine_trainvaltest.zip and "
                f"leftImg8bit_trainvaltest.zip, and build the AB images with the reference's "
                f"datasets/prepare_cityscapes_dataset.py. A is the photo and B the label map: train "
                f"labels -> photo with data.direction = 'BtoA'."
            )
        elif dataset in PIX2PIX_DATASETS:
            how = (
                f"Download it with the reference's script ({REFERENCE_REPO}):\n"
                f"    bash ./datasets/download_pix2pix_dataset.sh {dataset}\n"
                f"i.e. fetch {PIX2PIX_URL.format(name=dataset)} (the pix2pix datasets page) and untar it."
            )
        else:
            how = (
                f"{dataset!r} is not one of the pix2pix download script's datasets {PIX2PIX_DATASETS}; "
                f"combine your A and B images side by side with the reference's "
                f"datasets/combine_A_and_B.py."
            )
    return (
        f"{how}\nThen pass the folder that holds {dataset}/ (or {dataset}/ itself) as data.manual_dir; "
        f"{dataset}/ must contain {folders}."
    )


def resolve_root(manual_dir: str | os.PathLike, dataset: str, layout: str) -> str:
    """The dataset folder: `manual_dir/dataset` or `manual_dir` itself, whichever has the layout.

    Raises FileNotFoundError naming the missing folders, what to download and where to put it.
    """
    base = os.path.abspath(os.path.expanduser(os.fspath(manual_dir))) if manual_dir else ""
    candidates = [os.path.join(base, dataset), base] if base else []
    for root in candidates:
        if _missing_folders(root, layout) == []:
            return root
    if not base:
        problem = "data.manual_dir is empty."
    elif not os.path.isdir(base):
        problem = f"Folder {base!r} does not exist."
    else:
        root = candidates[0] if os.path.isdir(candidates[0]) else base
        problem = f"{root!r} lacks {' and '.join(_missing_folders(root, layout))}."
    how = download_instructions(layout, dataset)
    raise FileNotFoundError(f"{layout} image folders for {dataset!r} not found: {problem}\n{how}")


def _missing_folders(root: str, layout: str) -> list[str]:
    present = {d for d in ALIGNED_SPLITS + UNALIGNED_SPLITS if os.path.isdir(os.path.join(root, d))}
    if layout == "unaligned":
        return [f"{d}/" for d in UNALIGNED_SPLITS if d not in present]
    missing = [] if "train" in present else ["train/"]
    if not present & {"val", "test"}:
        missing.append("val/ or test/")
    return missing


def _list_files(folder: str) -> list[str]:
    """Sorted relative paths of the files under folder (recursive; hidden folders skipped)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [os.path.relpath(os.path.join(dirpath, f), folder) for f in filenames]
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# Decoding, converting and resizing one file (runs in pool workers).
# ---------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB as the reference's `.convert('RGB')` (alpha is dropped, not composited);
    16-bit and float greyscale are scaled to 0..255 first (PIL's own conversion would clip them)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        grey = np.clip(np.round(np.asarray(image, np.float64) / 257.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.round(np.asarray(image)), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def resize_bicubic(image: Image.Image, size: int) -> Image.Image:
    """(size, size) with PIL bicubic: the reference's transforms.Resize([size, size], BICUBIC)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BICUBIC)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # build speed over size
    return buf.getvalue()


def _load_job(job: tuple[str, str, int, bool]) -> tuple[str, str | None, object, str, str]:
    """(rel, path, load_size, aligned) -> (rel, None, [PNG bytes per image], original mode, content
    hash), or (rel, skip reason, detail, "", content hash) when the file cannot be used."""
    rel, path, load_size, aligned = job
    with open(path, "rb") as f:
        content = f.read()
    digest = hashlib.sha256(content).hexdigest()
    try:
        with Image.open(io.BytesIO(content)) as image:
            image.load()  # truncated files raise here
            mode = image.mode
            image = to_rgb(image)
    except UnidentifiedImageError:
        return rel, NOT_AN_IMAGE, "not a decodable image", "", digest
    except Image.DecompressionBombError as e:  # decoding it could exhaust memory
        return rel, TOO_LARGE, str(e), "", digest
    except Exception as e:  # noqa: BLE001 -- any decoder failure means skip and count this file
        return rel, CORRUPT_IMAGE, f"{type(e).__name__}: {e}", "", digest
    if aligned:
        w, h = image.size
        if w < 2:
            return rel, TOO_NARROW, f"{w}x{h}", "", digest
        half = w // 2  # the reference: A = left w//2 columns, B = the rest
        parts = [image.crop((0, 0, half, h)), image.crop((half, 0, w, h))]
    else:
        parts = [image]
    return rel, None, [_png(resize_bicubic(p, load_size)) for p in parts], mode, digest


class _Report:
    """Kept counts, skip counts per reason (and per split), a few examples, converted modes."""

    def __init__(self):
        self.kept: dict[str, int] = {}
        self.skipped: collections.Counter = collections.Counter()
        self.skipped_by_split: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self.converted: collections.Counter = collections.Counter()

    def skip(self, split: str, reason: str, rel: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.skipped_by_split[split][reason] += 1
        if len(self.examples[reason]) < _EXAMPLES_PER_REASON:
            name = os.path.join(split, rel)
            self.examples[reason].append(f"{name} ({detail})" if detail else name)

    def as_dict(self) -> dict:
        return {
            "kept": dict(self.kept),
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_by_split": {
                s: dict(sorted(c.items())) for s, c in sorted(self.skipped_by_split.items())
            },
            "skipped_examples": dict(sorted(self.examples.items())),
            "converted_to_rgb": dict(sorted(self.converted.items())),
        }


# ---------------------------------------------------------------------------------------------
# Builders.
# ---------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(eq=False)
class ImageFoldersConfig(tfds.core.BuilderConfig):
    """dataset: the folder's name (e.g. "horse2zebra", "cityscapes"); load_size: stored square size.

    `name` is derived as f"{dataset}_{load_size}", so different sizes never overwrite each other.
    """

    name: str = ""
    dataset: str = "horse2zebra"
    load_size: int = 286

    def __post_init__(self):
        if not _NAME_RE.match(self.dataset) or self.load_size < 8:
            raise ValueError(f"Invalid image-folders config: {self}")
        if not self.name:
            self.name = f"{self.dataset}_{self.load_size}"
        if self.description is None:
            self.description = f"{self.dataset} resized to {self.load_size}x{self.load_size} (bicubic)"


def _split_folders(builder, dl_manager, layout: str, splits: tuple[str, ...]) -> dict[str, str]:
    """Shared `_split_generators` work: find the root, reset the report, map split -> folder."""
    try:
        manual_dir = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # TFDS: missing or empty manual folder
        raise FileNotFoundError(f"{e}") from None
    dataset = builder.builder_config.dataset
    builder._root = resolve_root(manual_dir, dataset, layout)
    builder._report = _Report()
    return {
        s: os.path.join(builder._root, s) for s in splits if os.path.isdir(os.path.join(builder._root, s))
    }


def _iter_folder(builder, split: str, folder: str, aligned: bool):
    """Yields (index, rel, [PNG bytes]) for the kept files of one split folder, counting the rest."""
    report, size = builder._report, builder.builder_config.load_size
    jobs = []
    for rel in _list_files(folder):
        path = os.path.join(folder, rel)
        if not rel.lower().endswith(IMAGE_EXTENSIONS):
            report.skip(split, OTHER_FILE, rel)
        elif os.path.getsize(path) == 0:
            report.skip(split, EMPTY_FILE, rel)
        else:
            jobs.append((rel, path, size, aligned))
    report.kept[split] = 0
    first_with: dict[str, str] = {}  # content hash -> the first file of the split with it
    for rel, reason, payload, mode, digest in ordered_map(_load_job, jobs):
        if digest in first_with:
            report.skip(split, DUPLICATE, rel, f"same content as {first_with[digest]}")
            continue
        first_with[digest] = rel
        if reason is not None:
            report.skip(split, reason, rel, payload)
            continue
        if mode != "RGB":
            report.converted[mode] += 1
        index = report.kept[split]  # rank among the kept files: no gaps for skipped ones
        report.kept[split] += 1
        yield index, rel, payload
    if report.kept[split] == 0:  # TFDS cannot write an empty split
        raise ValueError(
            f"No usable images in {folder} ({len(jobs)} candidates); skipped: "
            f"{dict(report.skipped_by_split[split])}, e.g. {dict(report.examples)}."
        )


def _write_report(builder, start: float) -> None:
    cfg = builder.builder_config
    write_report(
        builder.data_dir,  # the temporary build directory while preparing; renamed on success
        {
            "dataset": builder.name,
            "config": cfg.name,
            "source_dataset": cfg.dataset,
            "load_size": cfg.load_size,
            "manual_dir": builder._root,
            **builder._report.as_dict(),
            "build_seconds": round(time.perf_counter() - start, 2),
        },
    )


class UnalignedFolders(tfds.core.GeneratorBasedBuilder):
    """CycleGAN-style unpaired folders ROOT/{trainA,trainB,testA,testB}; one split per folder.

    Construct with `UnalignedFolders(config=ImageFoldersConfig(dataset=..., load_size=...), data_dir=...,
    file_format="array_record")`; prepare with `download_and_prepare(download_config=
    tfds.download.DownloadConfig(manual_dir=FOLDER))`. Records: image (L, L, 3) uint8, domain int64
    (0 = A, 1 = B), filename (path relative to the split folder; reads back as bytes), index int64.
    """

    name = "unaligned_folders"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Duplicate files within a split and over-large images are skipped and counted.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the folder of a CycleGAN dataset (ROOT/trainA, trainB, testA, testB), or its parent, as "
        "manual_dir; e.g. run the reference's ./datasets/download_cyclegan_dataset.sh horse2zebra."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.load_size
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                    "domain": tfds.features.ClassLabel(names=["A", "B"]),
                    "filename": tfds.features.Text(),
                    "index": tfds.features.Scalar(np.int64),
                }
            ),
            homepage="https://github.com/junyanz/pytorch-CycleGAN-and-pix2pix",
            disable_shuffling=True,  # record i has index i (file-name order)
        )

    def _split_generators(self, dl_manager):
        folders = _split_folders(self, dl_manager, "unaligned", UNALIGNED_SPLITS)
        return {split: self._generate_examples(split, folder) for split, folder in folders.items()}

    def _generate_examples(self, split: str, folder: str):
        domain = split[-1]  # "trainA" -> "A"
        for index, rel, (png,) in _iter_folder(self, split, folder, aligned=False):
            yield index, {"image": png, "domain": domain, "filename": rel, "index": index}

    def _download_and_prepare(self, dl_manager, download_config):
        start = time.perf_counter()
        super()._download_and_prepare(dl_manager, download_config)
        _write_report(self, start)


class AlignedFolders(tfds.core.GeneratorBasedBuilder):
    """pix2pix-style folders ROOT/{train,val,test} of side-by-side AB images, split into A and B.

    Construct and prepare as `UnalignedFolders`. Splits: those of train/val/test that exist. Records:
    image_a, image_b (L, L, 3) uint8 (left and right half, each resized), filename, index int64.
    """

    name = "aligned_folders"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Duplicate files within a split and over-large images are skipped and counted.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the folder of a pix2pix dataset (ROOT/train and val/test with side-by-side AB images), or "
        "its parent, as manual_dir; e.g. run the reference's ./datasets/download_pix2pix_dataset.sh facades."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.load_size
        image = tfds.features.Image(shape=(s, s, 3), encoding_format="png")
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image_a": image,
                    "image_b": image,
                    "filename": tfds.features.Text(),
                    "index": tfds.features.Scalar(np.int64),
                }
            ),
            homepage="https://github.com/junyanz/pytorch-CycleGAN-and-pix2pix",
            disable_shuffling=True,  # record i has index i (file-name order)
        )

    def _split_generators(self, dl_manager):
        folders = _split_folders(self, dl_manager, "aligned", ALIGNED_SPLITS)
        return {split: self._generate_examples(split, folder) for split, folder in folders.items()}

    def _generate_examples(self, split: str, folder: str):
        for index, rel, (png_a, png_b) in _iter_folder(self, split, folder, aligned=True):
            yield index, {"image_a": png_a, "image_b": png_b, "filename": rel, "index": index}

    def _download_and_prepare(self, dl_manager, download_config):
        start = time.perf_counter()
        super()._download_and_prepare(dl_manager, download_config)
        _write_report(self, start)


# ---------------------------------------------------------------------------------------------
# prepare_translation: config -> built dataset + report.
# ---------------------------------------------------------------------------------------------


def make_translation_builder(data_config) -> tfds.core.DatasetBuilder:
    """The TFDS builder (array_record) that `data_config` names; nothing is built yet.

    Data config keys (the `config.data` block of a translation experiment):
      name          "synthetic_scenes" (built in), "unaligned_folders" (CycleGAN layout) or
                    "aligned_folders" (pix2pix AB layout)
      data_dir      where TFDS stores prepared datasets; "" = the TFDS default (~/tensorflow_datasets)
      manual_dir    folders only: the dataset folder (e.g. ~/datasets/horse2zebra) or its parent
      dataset       folders only: the dataset's folder name, e.g. "horse2zebra", "cityscapes"
      load_size     folders: stored size (the reference's 286); all: train images are resized to it
      crop_size     random train crop and test resize (the reference's 256)
      flip          random horizontal flips in training (the reference's default; --no_flip = False)
      direction     "AtoB" or "BtoA": which domain is the generator's input
      num_workers   grain worker processes (0 = read in the main process)
      test_split    aligned folders: split read by load_test_set; "" = "test" if it exists, else "val"
      synthetic.size, synthetic.num_train, synthetic.num_test   the built-in scenes' render size and
                    split sizes
      synthetic.domain_a, synthetic.domain_b   the features that are domains A and B: "photo_a"
                    (summer), "photo_b" (winter) or "label_image" (the colourised layout, pix2pix input)
    Keys that a dataset does not use may be absent.
    """
    data_dir = os.path.expanduser(data_config.data_dir) if data_config.get("data_dir") else None
    name = data_config.name
    if name == "synthetic_scenes":
        s = data_config.synthetic
        config = SyntheticScenesConfig(
            size=int(s.get("size", 64)), num_train=int(s.num_train), num_test=int(s.num_test)
        )
        return SyntheticScenes(config=config, data_dir=data_dir, file_format="array_record")
    if name in ("unaligned_folders", "aligned_folders"):
        config = ImageFoldersConfig(dataset=str(data_config.dataset), load_size=int(data_config.load_size))
        cls = UnalignedFolders if name == "unaligned_folders" else AlignedFolders
        return cls(config=config, data_dir=data_dir, file_format="array_record")
    raise ValueError(f"Unknown translation dataset {name!r}; choose one of {TRANSLATION_DATASETS}.")


def read_report(builder: tfds.core.DatasetBuilder) -> dict:
    """The prepare report written next to the records (or the split sizes if there is none)."""
    path = os.path.join(os.fspath(builder.data_dir), REPORT_FILENAME)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    splits = builder.info.splits
    return {"kept": {k: splits[k].num_examples for k in splits}, "skipped": {}}


def prepare_translation(data_config) -> tuple[tfds.core.DatasetBuilder, dict]:
    """Builds the dataset `data_config` names (keys: see `make_translation_builder`) unless built.

    Returns the builder (ready for `builder.as_data_source(split)`) and the report dict
    {"kept": {split: n}, "skipped": {reason: n}, "skipped_examples": {reason: [names]}, ...}.
    Raises FileNotFoundError saying what to download and where to put it when the folders are missing.
    In a multi-process job on a shared file system, call it on process 0 first and wait at a barrier.
    """
    builder = make_translation_builder(data_config)
    if not builder.is_prepared():
        download_config = None
        if data_config.name != "synthetic_scenes":
            layout = "unaligned" if data_config.name == "unaligned_folders" else "aligned"
            root = resolve_root(data_config.get("manual_dir", ""), str(data_config.dataset), layout)
            download_config = tfds.download.DownloadConfig(manual_dir=root)
        builder.download_and_prepare(download_config=download_config)
    return builder, read_report(builder)
