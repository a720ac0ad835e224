"""UTKFace file-name parsing and the builder on a fake folder with good and bad files."""

import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import zlib

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ganjax.data import pipeline, utkface
from ganjax.data.prepare import prepare
from ganjax.data.synthetic_faces import render

STORED = 48
TEST_PERCENT = 30.0


@pytest.mark.parametrize(
    "name, labels",
    [
        ("25_0_2_20170116174525125.jpg.chip.jpg", (25, 0, 2)),
        ("1_1_4_20161221193620470.jpg", (1, 1, 4)),  # in-the-wild name
        ("/some/dir/116_0_0_20170120134921760.jpg.chip.jpg", (116, 0, 0)),
        ("61_1_20170109150557335.jpg.chip.jpg", (61, 1, -1)),  # race missing
        ("39_1_20170116174525125.jpg.chip.jpg", (39, 1, -1)),
        ("24_0_1.jpg", (24, 0, 1)),  # no timestamp
        ("53__0_20170116184028385.jpg.chip.jpg", (53, -1, 0)),  # empty gender
        ("-3_0_1_20170116174525125.jpg", (-3, 0, 1)),  # parses; the builder skips it by range
        ("30_7_9_20170116184028385.jpg", (30, -1, -1)),  # codes out of range
        (" 45_1_3_20170119180530288 .jpg.chip.jpg", (45, 1, 3)),  # stray spaces
    ],
)
def test_parse_good_names(name, labels):
    assert utkface.parse_utkface_filename(name) == utkface.UTKFaceLabels(*labels)


@pytest.mark.parametrize(
    "name",
    [
        "hello_world.jpg",
        "IMG_0001.jpg",
        "20170116174525125.jpg",  # only a timestamp
        "25.jpg",
        "x_0_1_20170116174525125.jpg.chip.jpg",
        "1_2_3_4_5.jpg",
        "",
        "._25_0_2_20170116174525125.jpg.chip.jpg",  # macOS resource fork
    ],
)
def test_parse_garbage_raises(name):
    with pytest.raises(ValueError):
        utkface.parse_utkface_filename(name)


def test_split_hash_is_stable_and_proportional():
    names = [f"{i % 90}_0_0_2017010100{i:07d}.jpg.chip.jpg" for i in range(4000)]
    in_test = [utkface.is_test_file(n, 10) for n in names]
    assert in_test == [utkface.is_test_file("dir/" + n, 10) for n in names]  # base name only
    assert 0.08 < np.mean(in_test) < 0.12


def test_to_rgb_scales_16_bit():
    grey16 = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    buf = io.BytesIO()
    Image.fromarray(grey16).save(buf, format="PNG")
    rgb = np.asarray(utkface._to_rgb(Image.open(io.BytesIO(buf.getvalue()))))
    assert rgb.shape == (16, 16, 3)
    np.testing.assert_array_equal(rgb[..., 0].ravel(), np.arange(256))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (over PIL's limit: a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _good_names() -> list[str]:
    """Eight UTKFace-style names, at least two in each split."""
    names, k = [], 0
    while len(names) < 8 or {utkface.is_test_file(n, TEST_PERCENT) for n in names} != {0, 1}:
        names.append(f"{10 + 7 * k}_{k % 2}_{k % 5}_20170116{k:09d}.jpg.chip.jpg")
        k += 1
    return names


@pytest.fixture(scope="module")
def fake_utkface(tmp_path_factory):
    """A folder mixing usable faces, convertible formats and every kind of bad file."""
    root = tmp_path_factory.mktemp("UTKFace")
    sub = root / "part1"  # files may sit in subfolders
    sub.mkdir()
    good = {}
    for k, name in enumerate(_good_names()):
        labels = utkface.parse_utkface_filename(name)
        good[name] = render(k, labels.age, 64)
        (root / name).write_bytes(_jpeg(good[name]))
    kept = set(good)
    # Convertible: greyscale JPEG, RGBA PNG (transparent corner), palette PNG, 16-bit grey PNG,
    # a non-square in-the-wild photo, a 3000 x 3000 one (decoded at a reduced scale, then resized),
    # and a name that lacks the race field.
    face = render(100, 40.0, 64)
    rgba = np.dstack([face, np.full(face.shape[:2], 255, np.uint8)])
    rgba[:8, :8, 3] = 0
    convertible = {
        "40_1_2_20170117000000001.jpg": _jpeg(face[..., 0]),
        "41_0_1_20170117000000002.png": _png(Image.fromarray(rgba, "RGBA")),
        "42_1_3_20170117000000003.png": _png(Image.fromarray(face).quantize(64)),
        "43_0_0_20170117000000004.png": _png(Image.fromarray(face[..., 1].astype(np.uint16) * 257)),
        "44_0_4_20170117000000005.jpg": _jpeg(render(101, 44.0, 96)[:, 10:80]),
        "45_1_0_20170117000000006.jpg": _jpeg(np.kron(render(104, 45.0, 60), np.ones((50, 50, 1), np.uint8))),
    }
    for name, content in convertible.items():
        (sub / name).write_bytes(content)
    (root / "61_1_20170109150557335.jpg.chip.jpg").write_bytes(_jpeg(render(102, 61.0, 64)))
    kept |= set(convertible) | {"61_1_20170109150557335.jpg.chip.jpg"}
    # Bad files, one per reason (plus a second malformed name). The duplicate sorts after its twin.
    twin = (root / sorted(good)[0]).read_bytes()
    bad = {
        "99_0_0_20170118000000001.jpg.chip.jpg": ("duplicate", twin),
        "50_0_0_20170118000000002.jpg.chip.jpg": (
            "corrupt_or_truncated_image",
            _jpeg(render(103, 50.0, 64))[:-300],
        ),
        "51_1_0_20170118000000003.jpg.chip.jpg": ("empty_file", b""),
        "52_1_1_20170118000000004.jpg.chip.jpg": ("not_an_image", b"this is text, not a JPEG\n"),
        "hello_world.jpg": ("malformed_name", _jpeg(face)),
        "IMG_0001.jpg": ("malformed_name", _jpeg(face)),
        "200_0_0_20170118000000005.jpg.chip.jpg": ("age_out_of_range", _jpeg(face)),
        "README.txt": ("not_an_image_extension", b"notes\n"),
        "53_0_2_20170118000000006.jpg.chip.jpg": ("too_large", png_claiming(20_000, 20_000)),
    }
    expected_skips = {}
    for name, (reason, content) in bad.items():
        (root / name).write_bytes(content)
        expected_skips[reason] = expected_skips.get(reason, 0) + 1
    return root, good, kept, expected_skips


def _data_config(manual_dir, data_dir) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "name": "utkface",
            "data_dir": str(data_dir),
            "manual_dir": str(manual_dir),
            "size": 32,
            "utkface": {"stored_size": STORED, "test_percent": TEST_PERCENT},
        }
    )


@pytest.fixture(scope="module")
def built(fake_utkface, tmp_path_factory):
    root, *_ = fake_utkface
    data_dir = tmp_path_factory.mktemp("tfds")
    builder, report = prepare(_data_config(root, data_dir))
    return builder, report, data_dir


def _records(builder, split):
    source = builder.as_data_source(split)
    records = sorted((source[i] for i in range(len(source))), key=lambda r: r["index"])
    return [{**r, "filename": r["filename"].decode()} for r in records]  # Text reads as bytes


def test_builder_keeps_the_right_files(fake_utkface, built):
    _, good, kept, _ = fake_utkface
    builder, report, _ = built
    assert builder.name == "utkface"
    records = {split: _records(builder, split) for split in ("train", "test")}
    names = {split: [r["filename"] for r in recs] for split, recs in records.items()}
    assert sorted(names["train"] + names["test"]) == sorted(kept)
    assert report["kept"] == {split: len(n) for split, n in names.items()}
    for split, recs in records.items():
        assert [int(r["index"]) for r in recs] == list(range(len(recs)))
        for r in recs:
            assert utkface.is_test_file(r["filename"], TEST_PERCENT) == (split == "test")
            labels = utkface.parse_utkface_filename(r["filename"])
            assert (r["age"], r["gender"], r["race"]) == (labels.age, labels.gender, labels.race)
            assert r["image"].shape == (STORED, STORED, 3) and r["image"].dtype == np.uint8

    by_name = {r["filename"]: r for recs in records.values() for r in recs}
    assert by_name["61_1_20170109150557335.jpg.chip.jpg"]["race"] == -1
    for name, array in good.items():  # the stored face is the source face, resized
        expected = np.asarray(Image.fromarray(array).resize((STORED, STORED), Image.LANCZOS))
        assert np.mean(np.abs(by_name[name]["image"].astype(float) - expected)) < 4.0, name
    grey = by_name["40_1_2_20170117000000001.jpg"]["image"].astype(int)
    assert np.abs(grey[..., 0] - grey[..., 2]).max() <= 3  # greyscale became grey RGB
    rgba = by_name["41_0_1_20170117000000002.png"]["image"]
    assert rgba[:3, :3].min() > 235  # the transparent corner is composited on white


def test_builder_counts_every_skip_with_its_reason(fake_utkface, built):
    _, _, _, expected_skips = fake_utkface
    builder, report, _ = built
    assert report["skipped"] == expected_skips
    examples = report["skipped_examples"]
    assert any("99_0_0_20170118000000001" in e for e in examples["duplicate"])
    assert any("age 200" in e for e in examples["age_out_of_range"])
    assert any("truncated" in e for e in examples["corrupt_or_truncated_image"])
    with open(os.path.join(builder.data_dir, "prepare_report.json")) as f:
        assert json.load(f) == report


def test_prepare_reuses_the_build(fake_utkface, built, tmp_path):
    root, *_ = fake_utkface
    _, report, data_dir = built
    moved = tmp_path / "gone"  # a built dataset needs no manual folder any more
    builder, again = prepare(_data_config(moved, data_dir))
    assert again == report and builder.is_prepared()


def test_cli_prints_kept_and_skipped(fake_utkface, built):
    root, *_ = fake_utkface
    _, report, data_dir = built
    argv = [sys.executable, "-m", "ganjax.data.prepare", "--dataset", "utkface", "--manual_dir",
            str(root), "--data_dir", str(data_dir), "--size", str(STORED),
            "--test_percent", str(TEST_PERCENT)]  # fmt: skip
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"kept: test {report['kept']['test']}, train {report['kept']['train']}" in out.stdout
    for reason, count in report["skipped"].items():
        assert f"{reason}: {count}" in out.stdout


@pytest.mark.parametrize("kind", ["missing", "empty", "no_images", "packed"])
def test_unusable_folder_says_what_to_download(tmp_path, kind):
    folder = tmp_path / "UTKFace"
    if kind != "missing":
        folder.mkdir()
    if kind == "no_images":
        (folder / "notes.txt").write_text("nothing here")
    if kind == "packed":
        (folder / "UTKFace.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(FileNotFoundError) as err:
        prepare(_data_config(folder, tmp_path / "tfds"))
    message = str(err.value)
    assert "UTKFace.tar.gz" in message and "https://susanqq.github.io/UTKFace/" in message
    assert str(folder) in message and "manual_dir" in message
    if kind == "packed":
        assert "unpack" in message


def test_builder_itself_rejects_a_missing_folder(tmp_path):
    builder = utkface.UTKFace(
        config=utkface.UTKFaceConfig(stored_size=STORED),
        data_dir=str(tmp_path),
        file_format="array_record",
    )
    config = tfds.download.DownloadConfig(manual_dir=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="UTKFace.tar.gz"):
        builder.download_and_prepare(download_config=config)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_pipeline_reads_utkface_at_the_model_size(built, fake_utkface, caplog):
    root, *_ = fake_utkface
    builder, report, data_dir = built
    config = _data_config(root, data_dir)
    config.flip, config.num_workers = True, 0
    eval_set = pipeline.load_eval_set(config)
    n = report["kept"]["test"]
    assert eval_set["image"].shape == (n, 32, 32, 3)  # stored at 48, resized to data.size
    np.testing.assert_array_equal(eval_set["identity"], np.full(n, -1))
    np.testing.assert_array_equal(eval_set["index"], np.arange(n))
    with caplog.at_level(logging.WARNING):
        batch = next(pipeline.make_train_iterator(config, global_batch_size=4, seed=0))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["age"].shape == (4,)
    # The training log says what the build skipped, reason by reason.
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"skipped: {sum(report['skipped'].values())} files" in logged
    for reason, count in report["skipped"].items():
        assert f"{reason}: {count}" in logged


@pytest.mark.parametrize("kind", ["names_and_sizes", "undecodable"])
def test_a_folder_without_usable_faces_fails_before_training(tmp_path, kind):
    folder = tmp_path / "UTKFace"
    folder.mkdir()
    if kind == "names_and_sizes":
        (folder / "hello.jpg").write_bytes(_jpeg(render(0, 30.0, 32)))
        (folder / "25_0_0_20170116174525125.jpg").write_bytes(b"")
        (folder / "130_0_0_20170116174525126.jpg").write_bytes(_jpeg(render(1, 30.0, 32)))
    else:  # names pass, no file decodes
        for name in _good_names():
            (folder / name).write_bytes(f"not a face: {name}".encode())
    message = "train and 0 test files left" if kind == "names_and_sizes" else "none of the .* decodes"
    with pytest.raises(ValueError, match=rf"UTKFace in .*{message}.*Skipped: {{'"):
        prepare(_data_config(folder, tmp_path / "tfds"))
