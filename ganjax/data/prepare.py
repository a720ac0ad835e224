"""Builds the dataset a data config names, once, and reports what was kept and skipped.

Python:  builder, report = prepare(config.data)
CLI:     python -m ganjax.data.prepare --dataset utkface --manual_dir ~/data/UTKFace
         python -m ganjax.data.prepare --dataset synthetic_faces --size 64

The data config is the `config.data` block of configs/aging_utkface.py: `name`
("synthetic_faces" or "utkface"), `data_dir` ("" = the TFDS default), `size` (the synthetic render
size), `synthetic.*`, `utkface.*` and `manual_dir` (UTKFace only; `~` is expanded). Different
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
from absl import app, flags

from ganjax.data.synthetic_faces import REPORT_FILENAME, SyntheticFaces, SyntheticFacesConfig
from ganjax.data.utkface import UTKFace, UTKFaceConfig, check_manual_dir

DATASETS = ("synthetic_faces", "utkface")


def make_builder(data_config) -> tfds.core.DatasetBuilder:
    """The TFDS builder (array_record) for `data_config`; nothing is built yet."""
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
    Raises FileNotFoundError (saying what to download) when UTKFace's manual_dir is unusable.
    """
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


# ---- CLI ------------------------------------------------------------------------------------
# Flags are defined only when run as a script, so importing this module adds nothing to FLAGS.
# Defaults match the data block of configs/aging_utkface.py, so the CLI builds what training reads.


def _define_flags() -> None:
    flags.DEFINE_enum("dataset", "utkface", DATASETS, "Dataset to build.")
    flags.DEFINE_string("manual_dir", "~/data/UTKFace", "utkface: folder of the original files.")
    flags.DEFINE_string("data_dir", "", "TFDS data dir; empty = the TFDS default.")
    flags.DEFINE_integer(
        "size", None, "synthetic_faces: render size (default 64); utkface: stored size (128)."
    )
    flags.DEFINE_float("test_percent", 10.0, "utkface: share of files in the test split.")
    flags.DEFINE_integer("num_train", 4000, "synthetic_faces: train identities.")
    flags.DEFINE_integer("num_test_identities", 32, "synthetic_faces: test identities.")
    flags.DEFINE_list("test_ages", "5,15,25,35,45,55,65,75,85", "synthetic_faces: test ages.")


def data_config_from_flags(f=flags.FLAGS) -> ml_collections.ConfigDict:
    synthetic = f.dataset == "synthetic_faces"
    return ml_collections.ConfigDict(
        {
            "name": f.dataset,
            "data_dir": f.data_dir,
            "manual_dir": f.manual_dir,
            "size": f.size if synthetic and f.size else 64,
            "utkface": {
                "stored_size": f.size if not synthetic and f.size else 128,
                "test_percent": f.test_percent,
            },
            "synthetic": {
                "num_train": f.num_train,
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
