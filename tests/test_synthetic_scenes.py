"""Synthetic scenes: layouts, two-style renders, the TFDS builder and the fixed label classifier."""

import json
import os

import numpy as np
import pytest

from ganjax.data import synthetic_scenes as ss
from ganjax.evaluation import scene_labels

SIZE = 64


def _scenes(n: int, size: int = SIZE, split: str = "test"):
    labels = np.stack([ss.render_layout(ss.scene_seed(split, j), size) for j in range(n)])
    photos = {
        style: np.stack(
            [ss.render_photo(lab, ss.scene_seed(split, j), style) for j, lab in enumerate(labels)]
        )
        for style in ss.STYLES
    }
    return labels, photos


def test_layout_is_deterministic_and_plausible():
    a, b = ss.render_layout(3, SIZE), ss.render_layout(3, SIZE)
    assert a.dtype == np.uint8 and a.shape == (SIZE, SIZE)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, ss.render_layout(4, SIZE))
    labels, _ = _scenes(40)
    assert labels.max() < ss.NUM_CLASSES
    # Sky above, ground below: the top row is (almost) all sky or building, the bottom row never sky.
    top, bottom = labels[:, 0], labels[:, -1]
    assert np.isin(top, [ss.SKY, ss.BUILDING, ss.TREE]).mean() > 0.99 and (top == ss.SKY).mean() > 0.8
    assert not (bottom == ss.SKY).any()
    # Every class occurs somewhere in 40 scenes; the road reaches the bottom edge in most of them.
    assert set(np.unique(labels)) == set(range(ss.NUM_CLASSES))
    assert np.mean([(row == ss.ROAD).any() for row in bottom]) > 0.6


def test_photo_is_deterministic_and_styles_differ():
    labels = ss.render_layout(7, SIZE)
    a1, a2 = ss.render_photo(labels, 7, "A"), ss.render_photo(labels, 7, "A")
    assert a1.dtype == np.uint8 and a1.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, ss.render_photo(labels, 8, "A"))  # the seed varies textures
    b = ss.render_photo(labels, 7, "B")
    assert np.abs(a1.astype(int) - b.astype(int)).mean() > 30  # clearly different styles
    with pytest.raises(ValueError, match="style"):
        ss.render_photo(labels, 7, "C")
    np.testing.assert_array_equal(ss.colorize_labels(labels)[labels == ss.ROAD][0], ss.CLASS_COLORS[ss.ROAD])


def test_class_colour_statistics():
    labels, photos = _scenes(24)

    def mean(style, cls):
        return photos[style][labels == cls].astype(float).mean(axis=0)

    def std(style, cls):
        return photos[style][labels == cls].astype(float).std(axis=0).mean()

    sky, grass, tree, road = (mean("A", c) for c in (ss.SKY, ss.GRASS, ss.TREE, ss.ROAD))
    assert sky[2] > sky[0] + 40  # blue sky
    assert grass[1] > grass[0] + 30 and grass[1] > grass[2] + 30  # green grass
    assert tree[1] < grass[1] - 20  # foliage darker than grass
    assert np.ptp(road) < 20  # grey asphalt
    assert std("A", ss.GRASS) > std("A", ss.SKY) * 0.5
    snow, asphalt = mean("B", ss.GRASS), mean("B", ss.ROAD)
    assert snow.min() > 200 and asphalt.max() < 90  # winter: snow and dark wet road
    assert mean("B", ss.SKY)[2] - mean("B", ss.SKY)[0] < 30  # overcast, not blue


def test_label_classifier_scores_renders_high_and_noise_low():
    labels, photos = _scenes(24)
    for style in ss.STYLES:
        scores = scene_labels.label_accuracy(photos[style], labels, style)
        assert scores["pixel_accuracy"] > 0.95, (style, scores)
        assert scores["mean_iou"] > 0.85, (style, scores)
    # Float input in [-1, 1] scores like uint8.
    as_float = photos["A"].astype(np.float32) / 127.5 - 1.0
    assert scene_labels.label_accuracy(as_float, labels, "A") == pytest.approx(
        scene_labels.label_accuracy(photos["A"], labels, "A")
    )
    noise = np.random.default_rng(0).integers(0, 256, photos["A"].shape, dtype=np.uint8)
    assert scene_labels.label_accuracy(noise, labels, "A")["pixel_accuracy"] < 0.1
    assert scene_labels.label_accuracy(noise, labels, "A", reject_threshold=None)["pixel_accuracy"] < 0.3
    # Copying the label map, or rendering the other style, is not a photo of this style.
    assert scene_labels.label_accuracy(ss.colorize_labels(labels), labels, "A")["pixel_accuracy"] < 0.2
    assert scene_labels.label_accuracy(photos["B"], labels, "A")["pixel_accuracy"] < 0.3
    # A photo of another layout scores far lower than the right one.
    assert scene_labels.label_accuracy(photos["A"][::-1], labels, "A")["mean_iou"] < 0.5


def test_confusion_metrics():
    unknown = scene_labels.UNKNOWN
    labels = np.array([[0, 0, 1, 1, 1]])
    pred = np.array([[0, 1, 1, 1, unknown]])  # one "looks like no class" pixel counts as an error
    confusion = scene_labels.confusion_matrix(labels, pred, ss.NUM_CLASSES)
    scores = scene_labels.scores_from_confusion(confusion)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 5)
    assert scores["mean_class_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # absent classes left out
    assert scores["mean_iou"] == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_builder_records_are_the_renders_in_index_order(tmp_path):
    config = ss.SyntheticScenesConfig(size=32, num_train=6, num_test=3)
    assert config.name == "s32_n6_t3"
    builder = ss.SyntheticScenes(config=config, data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    test = builder.as_data_source("test")
    assert len(builder.as_data_source("train")) == 6 and len(test) == 3
    for i in range(3):
        record, scene = test[i], ss.render_scene(ss.scene_seed("test", i), 32)
        assert record["index"] == i
        for key in ("photo_a", "photo_b", "label_image", "labels"):
            np.testing.assert_array_equal(record[key], scene[key])
    with open(os.path.join(builder.data_dir, "prepare_report.json")) as f:
        report = json.load(f)
    assert report["kept"] == {"train": 6, "test": 3} and report["skipped"] == {}
