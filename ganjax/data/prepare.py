"""Builds the dataset a data config names, once, and reports what was kept and skipped.

Python:  builder, report = prepare(config.data)
CLI:     python -m ganjax.data.prepare --dataset utkface --manual_dir ~/data/UTKFace
         python -m ganjax.data.prepare --dataset synthetic_faces --size 64
         python -m ganjax.data.prepare --dataset synthetic_scenes --size 64 --num_train 2000 --num_test 200
         python -m ganjax.data.prepare --dataset unaligned_folders --folder horse2zebra --manual_dir ~/data
         python -m ganjax.data.prepare --dataset aligned_folders --folder cityscapes --manual_dir ~/data

The data config is the `config.data` block of an experiment config. Aging (configs/aging_utkface.py):
`name` ("synthetic_faces" or "utkface"), `data_dir` ("" = the TFDS default), `size` (the synthetic render
size), `synthetic.*`, `utkface.*` and `manual_dir` (UTKFace only; `~` is expanded). Image-to-image
translation (configs/pix2pix_cityscapes.py, configs/cyclegan_horse2zebra.py): `name` ("synthetic_scenes",
"unaligned_folders" or "aligned_folders") and the keys of
`ganjax.data.image_folders.make_translation_builder`; those are built by `prepare_translation`. Different
settings build into different config directories, so they never overwrite each other.

In a multi-process job on a shared file system, call `prepare` on process 0 first and wait at a
barrier before the others read: TFDS writes to a temporary directory and renames it, but two
simultaneous builds of the same dataset would race.
"""

from __future__ import annotations

import json
import os

import ml_collections
import tensorflow_datasets as tfds
from absl import app, flags, logging

from ganjax.data.image_folders import TRANSLATION_DATASETS, make_translation_builder, prepare_translation
from ganjax.data.synthetic_faces import REPORT_FILENAME, SyntheticFaces, SyntheticFacesConfig
from ganjax.data.utkface import UTKFace, UTKFaceConfig, check_manual_dir

AGING_DATASETS = ("synthetic_faces", "utkface")
DATASETS = AGING_DATASETS + TRANSLATION_DATASETS


def make_builder(data_config) -> tfds.core.DatasetBuilder:
    """The TFDS builder (array_record) for `data_config`; nothing is built yet."""
    if data_config.name in TRANSLATION_DATASETS:
        return make_translation_builder(data_config)
    data_dir = os.path.expanduser(data_config.data_dir) if data_config.data_dir else None
    if data_config.name == "synthetic_faces":
        s = data_config.synthetic
        config = SyntheticFacesConfig(
            size=int(data_config.size),
            num_train=int(s.num_train),
            num_test_identities=int(s.num_test_identities),
            test_ages=tuple(s.test_ages),
        )
        return SyntheticFaces(config=config, data_dir=data_dir, file_format="array_record")
    if data_config.name == "utkface":
        u = data_config.utkface
        config = UTKFaceConfig(stored_size=int(u.stored_size), test_percent=float(u.test_percent))
        return UTKFace(config=config, data_dir=data_dir, file_format="array_record")
    raise ValueError(f"Unknown dataset {data_config.name!r}; choose one of {DATASETS}.")


def read_report(builder: tfds.core.DatasetBuilder) -> dict:
    """The prepare report written next to the records (or the split sizes if there is none)."""
    path = os.path.join(os.fspath(builder.data_dir), REPORT_FILENAME)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    splits = builder.info.splits
    return {"kept": {k: splits[k].num_examples for k in splits}, "skipped": {}}


def prepare(data_config) -> tuple[tfds.core.DatasetBuilder, dict]:
    """Builds `data_config.name` into `data_config.data_dir` unless already built.

    Returns the builder (ready for `builder.as_data_source(split)`) and the report dict:
    {"kept": {split: n}, "skipped": {reason: n}, "skipped_examples": {reason: [names]}, ...}.
    Raises FileNotFoundError (saying what to download) when UTKFace's manual_dir or an image folder
    is unusable.
    """
    if data_config.name in TRANSLATION_DATASETS:
        return prepare_translation(data_config)
    builder = make_builder(data_config)
    if not builder.is_prepared():
        download_config = None
        if data_config.name == "utkface":
            manual_dir = check_manual_dir(data_config.manual_dir)
            download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        builder.download_and_prepare(download_config=download_config)
    return builder, read_report(builder)


def format_report(builder: tfds.core.DatasetBuilder, report: dict) -> str:
    lines = [f"{builder.name}/{builder.builder_config.name} in {builder.data_dir}"]
    lines.append("kept: " + ", ".join(f"{k} {v}" for k, v in sorted(report["kept"].items())))
    skipped = report.get("skipped", {})
    lines.append(f"skipped: {sum(skipped.values())} files")
    for reason, count in sorted(skipped.items()):
        lines.append(f"  {reason}: {count}")
        for example in report.get("skipped_examples", {}).get(reason, []):
            lines.append(f"      e.g. {example}")
    return "\n".join(lines)


def log_report(builder: tfds.core.DatasetBuilder, report: dict) -> None:
    """The prepare report in the training log (the train pipelines call this once per run): a warning
    when files were skipped, so that a dataset that lost files to bad data says so where runs are read."""
    skipped = sum(report.get("skipped", {}).values())
    log = logging.warning if skipped else logging.info
    log("Training data: %s", format_report(builder, report).replace("\n", "\n    "))


# ---- CLI ------------------------------------------------------------------------------------
# Flags are defined only when run as a script, so importing this module adds nothing to FLAGS.
# Defaults match the data blocks of configs/aging_utkface.py, configs/pix2pix_cityscapes.py and
# configs/cyclegan_horse2zebra.py, so the CLI builds what training reads.
_DEFAULT_MANUAL_DIRS = {
    "utkface": "~/data/UTKFace",
    "unaligned_folders": "~/datasets",
    "aligned_folders": "~/datasets",
}


def _define_flags() -> None:
    flags.DEFINE_enum("dataset", "utkface", DATASETS, "Dataset to build.")
    flags.DEFINE_string(
        "manual_dir",
        None,
        "utkface: folder of the original files (default ~/data/UTKFace); unaligned_folders / "
        "aligned_folders: the dataset folder or its parent (default ~/datasets).",
    )
    flags.DEFINE_string("data_dir", "", "TFDS data dir; empty = the TFDS default.")
    flags.DEFINE_integer(
        "size",
        None,
        "synthetic_faces / synthetic_scenes: render size (default 64); utkface: stored size (128); "
        "unaligned_folders / aligned_folders: load_size (286).",
    )
    flags.DEFINE_float("test_percent", 10.0, "utkface: share of files in the test split.")
    flags.DEFINE_integer(
        "num_train", None, "synthetic_faces: train identities (4000); synthetic_scenes: train scenes (2000)."
    )
    flags.DEFINE_integer("num_test_identities", 32, "synthetic_faces: test identities.")
    flags.DEFINE_list("test_ages", "5,15,25,35,45,55,65,75,85", "synthetic_faces: test ages.")
    flags.DEFINE_integer("num_test", 200, "synthetic_scenes: test scenes.")
    flags.DEFINE_string(
        "folder", None, "unaligned_folders / aligned_folders: the dataset's folder name, e.g. horse2zebra."
    )


def _translation_config_from_flags(f) -> ml_collections.ConfigDict:
    if f.dataset != "synthetic_scenes" and not f.folder:
        example = "horse2zebra" if f.dataset == "unaligned_folders" else "cityscapes"
        raise app.UsageError(f"--dataset {f.dataset} needs --folder, e.g. --folder {example}.")
    size = f.size or (64 if f.dataset == "synthetic_scenes" else 286)
    return ml_collections.ConfigDict(
        {
            "name": f.dataset,
            "data_dir": f.data_dir,
            "manual_dir": f.manual_dir or _DEFAULT_MANUAL_DIRS.get(f.dataset, ""),
            "dataset": f.folder or "",
            "load_size": size,
            "synthetic": {"size": size, "num_train": f.num_train or 2000, "num_test": f.num_test},
        }
    )


def data_config_from_flags(f=flags.FLAGS) -> ml_collections.ConfigDict:
    if f.dataset in TRANSLATION_DATASETS:
        return _translation_config_from_flags(f)
    synthetic = f.dataset == "synthetic_faces"
    return ml_collections.ConfigDict(
        {
            "name": f.dataset,
            "data_dir": f.data_dir,
            "manual_dir": f.manual_dir or _DEFAULT_MANUAL_DIRS["utkface"],
            "size": f.size if synthetic and f.size else 64,
            "utkface": {
                "stored_size": f.size if not synthetic and f.size else 128,
                "test_percent": f.test_percent,
            },
            "synthetic": {
                "num_train": f.num_train or 4000,
                "num_test_identities": f.num_test_identities,
                "test_ages": tuple(float(a) for a in f.test_ages),
            },
        }
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    builder, report = prepare(data_config_from_flags())
    print(format_report(builder, report))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
