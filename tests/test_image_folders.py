"""Image-folder builders (CycleGAN and pix2pix layouts): resizing, skip report, missing-folder messages."""

import io
import json
import logging
import os
import struct
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from ganjax.data import image_folders, translation_pipeline

LOAD = 20


def _random_image(seed: int, size=(24, 18), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_bad_files(folder) -> None:
    """A corrupt 'jpg', a zero-byte file, a truncated PNG and a non-image file."""
    (folder / "corrupt.jpg").write_bytes(b"this is not a JPEG at all" * 10)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.png").write_bytes(_png_bytes(_random_image(99))[:200])
    (folder / "notes.txt").write_text("not an image")


def make_unaligned_tree(root) -> dict[str, list[str]]:
    """ROOT/horse2zebra/{trainA,trainB,testA,testB}; returns the good files' paths per split, name order."""
    base = root / "horse2zebra"
    good = {
        "trainA": [_random_image(1), _random_image(2, mode="L"), _random_image(3)],
        "trainB": [_random_image(4, mode="RGBA"), _random_image(5, mode="P")],
        "testA": [_random_image(6)],
        "testB": [_random_image(7), _random_image(8)],
    }
    paths = {}
    for split, images in good.items():
        (base / split).mkdir(parents=True)
        paths[split] = []
        for i, image in enumerate(images):
            path = (
                base / split / f"img_{i:02d}.{'jpg' if i == 0 and image.mode == 'RGB' else 'png'}"
            )  # the real sets are JPEGs
            image.save(path)
            paths[split].append(path)
    write_bad_files(base / "trainA")
    return paths


def make_aligned_tree(root, n_train: int = 3, n_val: int = 2, same_halves: bool = False) -> dict:
    """ROOT/facades/{train,val} of side-by-side AB images; returns (A, B) halves per split."""
    base = root / "facades"
    out = {}
    for split, n in (("train", n_train), ("val", n_val)):
        (base / split).mkdir(parents=True)
        out[split] = []
        for i in range(n):
            a = np.asarray(_random_image(100 + i + 10 * len(split), size=(16, 16)))
            b = a if same_halves else np.asarray(_random_image(200 + i + 10 * len(split), size=(16, 16)))
            Image.fromarray(np.concatenate([a, b], axis=1)).save(base / split / f"{i + 1}.png")  # lossless
            out[split].append((a, b))
    return out


def _config(name, root, data_dir, dataset, load=LOAD):
    return ml_collections.ConfigDict(
        {
            "name": name,
            "data_dir": str(data_dir),
            "manual_dir": str(root),
            "dataset": dataset,
            "load_size": load,
        }
    )


def _expected(image: Image.Image, size: int = LOAD) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))


def test_unaligned_builder_counts_skips_and_converts(tmp_path):
    good = make_unaligned_tree(tmp_path / "src")
    config = _config("unaligned_folders", tmp_path / "src", tmp_path / "tfds", "horse2zebra")
    builder, report = image_folders.prepare_translation(config)
    assert builder.builder_config.name == "horse2zebra_20"
    assert report["kept"] == {"trainA": 3, "trainB": 2, "testA": 1, "testB": 2}
    assert report["skipped"] == {
        "corrupt_or_truncated_image": 1,
        "empty_file": 1,
        "not_an_image": 1,
        "not_an_image_extension": 1,
    }
    assert report["skipped_by_split"] == {"trainA": report["skipped"]}
    assert report["skipped_examples"]["empty_file"] == ["trainA/empty.jpg"]
    assert report["converted_to_rgb"] == {"L": 1, "P": 1, "RGBA": 1}
    with open(os.path.join(builder.data_dir, "prepare_report.json")) as f:
        assert json.load(f) == report
    for split, paths in good.items():
        source = builder.as_data_source(split)
        for i, path in enumerate(paths):
            record = source[i]
            assert record["index"] == i and record["domain"] == (split[-1] == "B")
            assert record["filename"].decode() == path.name
            # RGB conversion + bicubic resize to load_size, as the reference's resize_and_crop
            np.testing.assert_array_equal(record["image"], _expected(Image.open(path)))
    # A second call reuses the build and returns the stored report.
    _, again = image_folders.prepare_translation(config)
    assert again == report


def test_aligned_builder_splits_ab_halves(tmp_path):
    halves = make_aligned_tree(tmp_path / "src")
    write_bad_files(tmp_path / "src" / "facades" / "val")
    Image.fromarray(np.zeros((8, 1, 3), np.uint8)).save(
        tmp_path / "src" / "facades" / "train" / "z_narrow.png"
    )
    config = _config("aligned_folders", tmp_path / "src" / "facades", tmp_path / "tfds", "facades")
    builder, report = image_folders.prepare_translation(config)
    assert report["kept"] == {"train": 3, "val": 2}
    assert report["skipped_by_split"]["train"] == {"too_narrow_for_ab_split": 1}
    assert sum(report["skipped_by_split"]["val"].values()) == 4
    for split, pairs in halves.items():
        source = builder.as_data_source(split)
        for i, (a, b) in enumerate(pairs):
            # Recompute from the file exactly as the reference: A = left w//2 columns, B = the rest.
            ab = Image.open(tmp_path / "src" / "facades" / split / f"{i + 1}.png").convert("RGB")
            w, h = ab.size
            np.testing.assert_array_equal(source[i]["image_a"], _expected(ab.crop((0, 0, w // 2, h))))
            np.testing.assert_array_equal(source[i]["image_b"], _expected(ab.crop((w // 2, 0, w, h))))
            np.testing.assert_array_equal(source[i]["image_a"], _expected(Image.fromarray(a)))
            np.testing.assert_array_equal(source[i]["image_b"], _expected(Image.fromarray(b)))


def test_missing_folders_say_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        image_folders.resolve_root(tmp_path / "nowhere", "horse2zebra", "unaligned")
    msg = str(e.value)
    assert "does not exist" in msg and "download_cyclegan_dataset.sh horse2zebra" in msg
    assert "horse2zebra.zip" in msg and "trainA/ trainB/ testA/ testB/" in msg

    (tmp_path / "summer2winter_yosemite" / "trainA").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="lacks trainB/ and testA/ and testB/"):
        image_folders.resolve_root(tmp_path, "summer2winter_yosemite", "unaligned")

    with pytest.raises(FileNotFoundError) as e:
        image_folders.resolve_root(tmp_path, "tiger2leopard", "unaligned")
    assert "same layout" in str(e.value)

    with pytest.raises(FileNotFoundError) as e:
        image_folders.resolve_root(tmp_path, "cityscapes", "aligned")
    msg = str(e.value)
    assert "cityscapes.tar.gz" in msg and "cityscapes-dataset.com" in msg and "BtoA" in msg

    (tmp_path / "facades" / "train").mkdir(parents=True)
    with pytest.raises(
        FileNotFoundError, match=r"(?s)lacks val/ or test/.*download_pix2pix_dataset.sh facades"
    ):
        image_folders.resolve_root(tmp_path, "facades", "aligned")

    config = _config("aligned_folders", tmp_path / "missing", tmp_path / "tfds", "edges2shoes")
    with pytest.raises(FileNotFoundError, match="edges2shoes.tar.gz"):
        image_folders.prepare_translation(config)


def test_resolve_root_accepts_the_folder_or_its_parent(tmp_path):
    make_aligned_tree(tmp_path)
    root = str(tmp_path / "facades")
    assert image_folders.resolve_root(tmp_path, "facades", "aligned") == root
    assert image_folders.resolve_root(root, "facades", "aligned") == root


def test_unknown_dataset_name_is_rejected():
    with pytest.raises(ValueError, match="choose one of"):
        image_folders.make_translation_builder(ml_collections.ConfigDict({"name": "imagenet"}))


def test_to_rgb_matches_the_reference_conversion():
    rgba = _random_image(11, mode="RGBA")
    np.testing.assert_array_equal(np.asarray(image_folders.to_rgb(rgba)), np.asarray(rgba.convert("RGB")))
    deep = Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16))  # 16-bit greyscale
    assert deep.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(image_folders.to_rgb(deep))[0, :, 0], [0, 100, 255])


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: PIL refuses to decode it (a decompression
    bomb when the size is over its limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize("layout", ["unaligned", "aligned"])
def test_duplicates_deep_large_and_oversized_images(tmp_path, layout, caplog):
    """Byte-identical copies are kept once, 16-bit and very large images are converted and resized,
    an image over PIL's size limit is skipped; the report counts each and training logs it."""
    if layout == "unaligned":
        dataset, splits = "horse2zebra", image_folders.UNALIGNED_SPLITS
    else:
        dataset, splits = "facades", ("train", "val")
    base = tmp_path / "src" / dataset
    for seed, split in enumerate(splits):
        (base / split).mkdir(parents=True)
        _random_image(seed, size=(32, 16)).save(base / split / "a.png")
    train = base / splits[0]
    (train / "b_copy.png").write_bytes((train / "a.png").read_bytes())  # duplicate of a.png
    deep = (np.arange(32 * 16, dtype=np.uint16).reshape(16, 32) * 127).astype(np.uint16)
    Image.fromarray(deep).save(train / "c_deep.png")  # 16-bit greyscale
    big = _random_image(5, size=(64, 32)).resize((4000, 2000), Image.Resampling.NEAREST)
    big.save(train / "d_big.jpg", quality=90)  # 8 megapixels: resized like any other
    (train / "e_bomb.png").write_bytes(png_claiming(20_000, 20_000))  # 400 megapixels: refused
    (train / "f_copy_of_copy.png").write_bytes((train / "a.png").read_bytes())

    config = _config(f"{layout}_folders", tmp_path / "src", tmp_path / "tfds", dataset)
    builder, report = image_folders.prepare_translation(config)
    assert report["kept"][splits[0]] == 3  # a, c_deep, d_big
    assert report["skipped_by_split"][splits[0]] == {"duplicate": 2, "too_large": 1}
    assert report["skipped_examples"]["duplicate"][0] == f"{splits[0]}/b_copy.png (same content as a.png)"
    assert "decompression bomb" in report["skipped_examples"]["too_large"][0]
    assert report["converted_to_rgb"] == {"I;16": 1}
    source = builder.as_data_source(splits[0])
    names = [source[i]["filename"].decode() for i in range(len(source))]
    assert names == ["a.png", "c_deep.png", "d_big.jpg"]
    key = "image" if layout == "unaligned" else "image_b"
    big = Image.open(train / "d_big.jpg")
    np.testing.assert_array_equal(
        source[2][key], _expected(big if layout == "unaligned" else big.crop((2000, 0, 4000, 2000)))
    )

    # Training logs the report (a warning: files were lost) when its iterator is made.
    config.update(crop_size=LOAD, flip=False, direction="AtoB", num_workers=0)
    make = translation_pipeline.make_unpaired_iterator
    if layout == "aligned":
        make = translation_pipeline.make_paired_iterator
    with caplog.at_level(logging.WARNING):
        iterator = make(config, global_batch_size=1, seed=0)
    iterator.close()
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "Training data:" in logged and "skipped: 3 files" in logged and "duplicate: 2" in logged


def test_a_split_without_usable_images_stops_the_build(tmp_path):
    make_unaligned_tree(tmp_path / "src")
    train_b = tmp_path / "src" / "horse2zebra" / "trainB"
    for path in train_b.iterdir():
        path.unlink()
    write_bad_files(train_b)
    config = _config("unaligned_folders", tmp_path / "src", tmp_path / "tfds", "horse2zebra")
    message = r"No usable images in .*trainB \(2 candidates\); skipped: .*empty_file"
    with pytest.raises(ValueError, match=message):
        image_folders.prepare_translation(config)
