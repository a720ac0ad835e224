"""grain train iterator and eval arrays over a tiny synthetic_faces build."""

import json

import ml_collections
import numpy as np
import pytest

from ganjax.data import pipeline, synthetic_faces
from ganjax.data.prepare import prepare

SIZE = 32
NUM_TRAIN = 40
TEST_AGES = (10.0, 50.0, 90.0)


def _config(data_dir, **overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        {
            "name": "synthetic_faces",
            "data_dir": str(data_dir),
            "manual_dir": "",
            "size": SIZE,
            "flip": False,
            "num_workers": 0,
            "synthetic": {
                "num_train": NUM_TRAIN,
                "num_test_identities": 3,
                "test_ages": TEST_AGES,
            },
            "utkface": {"stored_size": 64, "test_percent": 10},
        }
    )
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    prepare(_config(path))  # build once for the module
    return path


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _equal(a: list[dict], b: list[dict]) -> bool:
    pairs = zip(a, b, strict=True)
    return all(np.array_equal(x[k], y[k]) for x, y in pairs for k in ("image", "age"))


def test_batches_have_the_promised_shapes_and_ranges(data_dir):
    it = pipeline.make_train_iterator(_config(data_dir, flip=True), global_batch_size=8, seed=0)
    for batch in _take(it, 3):
        assert set(batch) == {"image", "age"}
        assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
        assert batch["age"].shape == (8,) and batch["age"].dtype == np.float32
        assert -1.0 <= batch["image"].min() < 0.0 < batch["image"].max() <= 1.0
        assert np.all((batch["age"] >= 0) & (batch["age"] <= 100))


def test_deterministic_given_seed(data_dir):
    config = _config(data_dir, flip=True)
    a = _take(pipeline.make_train_iterator(config, global_batch_size=8, seed=3), 3)
    b = _take(pipeline.make_train_iterator(config, global_batch_size=8, seed=3), 3)
    c = _take(pipeline.make_train_iterator(config, global_batch_size=8, seed=4), 3)
    assert _equal(a, b) and not _equal(a, c)


def test_each_epoch_is_a_fresh_shuffle_of_every_record(data_dir):
    it = pipeline.make_train_iterator(_config(data_dir), global_batch_size=8, seed=0)
    per_epoch = NUM_TRAIN // 8
    ages = np.concatenate([b["age"] for b in _take(it, 2 * per_epoch)])
    first, second = ages[:NUM_TRAIN], ages[NUM_TRAIN:]
    all_ages = [np.float32(synthetic_faces.train_age(i)) for i in range(NUM_TRAIN)]
    assert sorted(first) == sorted(all_ages) == sorted(second)
    assert not np.array_equal(first, second)


def test_state_restores_the_next_batch_exactly(data_dir):
    config = _config(data_dir, flip=True)
    it = pipeline.make_train_iterator(config, global_batch_size=8, seed=1)
    _take(it, 7)  # crosses an epoch boundary (5 batches per epoch)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = _take(it, 2)
    restored = pipeline.make_train_iterator(config, global_batch_size=8, seed=1)
    restored.set_state(state)
    assert _equal(_take(restored, 2), expected)


def test_state_restore_with_worker_processes(data_dir):
    config = _config(data_dir, flip=True, num_workers=1)
    it = pipeline.make_train_iterator(config, global_batch_size=8, seed=1)
    try:
        _take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        expected = _take(it, 2)
    finally:
        it.close()
    restored = pipeline.make_train_iterator(config, global_batch_size=8, seed=1)
    try:
        restored.set_state(state)
        got = _take(restored, 2)
    finally:
        restored.close()
    assert type(got[0]["image"]) is np.ndarray  # plain arrays, not shared memory
    assert _equal(got, expected)


def test_process_shards_are_disjoint_and_cover_the_data(data_dir):
    config = _config(data_dir)
    shards = []
    for process_index in range(2):
        it = pipeline.make_train_iterator(
            config, global_batch_size=8, seed=0, process_index=process_index, process_count=2
        )
        batches = _take(it, NUM_TRAIN // 2 // 4)  # one epoch of this shard, 4 per process
        assert batches[0]["image"].shape == (4, SIZE, SIZE, 3)
        shards.append({float(a) for b in batches for a in b["age"]})
    assert len(shards[0]) == len(shards[1]) == NUM_TRAIN // 2
    assert not shards[0] & shards[1]
    assert len(shards[0] | shards[1]) == NUM_TRAIN


def test_flips_mirror_some_images(data_dir):
    plain = _take(pipeline.make_train_iterator(_config(data_dir), global_batch_size=8, seed=0), 2)
    flipped = _take(
        pipeline.make_train_iterator(_config(data_dir, flip=True), global_batch_size=8, seed=0), 2
    )
    same = mirrored = 0
    for p, f in zip(plain, flipped, strict=True):
        np.testing.assert_array_equal(p["age"], f["age"])  # flips do not change the order
        for x, y in zip(p["image"], f["image"], strict=True):
            same += np.array_equal(x, y)
            mirrored += np.array_equal(x[:, ::-1], y) and not np.array_equal(x, y)
    assert same + mirrored == 16 and same > 0 and mirrored > 0


def test_bad_batch_split_is_rejected(data_dir):
    with pytest.raises(ValueError, match="divisible"):
        config = _config(data_dir)
        pipeline.make_train_iterator(config, global_batch_size=6, seed=0, process_count=4)


def test_to_model_image_resizes_and_scales():
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, 20:] = 255
    out = pipeline.to_model_image(image, SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.float32
    assert out[0, 0, 0] == -1.0 and out[0, -1, 0] == 1.0


def test_eval_set_is_ordered_and_matches_the_renderer(data_dir):
    config = _config(data_dir)
    full = pipeline.load_eval_set(config)
    n = 3 * len(TEST_AGES)
    assert full["image"].shape == (n, SIZE, SIZE, 3) and full["image"].dtype == np.float32
    assert full["age"].dtype == np.float32 and full["identity"].dtype == np.int64
    np.testing.assert_array_equal(full["index"], np.arange(n))
    np.testing.assert_array_equal(full["age"], np.tile(TEST_AGES, 3))
    expected_ids = synthetic_faces.TEST_IDENTITY_OFFSET + np.repeat(np.arange(3), len(TEST_AGES))
    np.testing.assert_array_equal(full["identity"], expected_ids)
    truth = synthetic_faces.render(int(full["identity"][4]), float(full["age"][4]), SIZE)
    np.testing.assert_array_equal(full["image"][4], truth.astype(np.float32) / 127.5 - 1.0)

    head = pipeline.load_eval_set(config, max_examples=4)
    for key in full:
        np.testing.assert_array_equal(head[key], full[key][:4])
    train = pipeline.load_eval_set(config, split="train", max_examples=5)
    np.testing.assert_array_equal(train["identity"], np.arange(5))
