"""The procedural face renderer and the synthetic_faces TFDS builder."""

import json
import os

import numpy as np
import pytest

from ganjax.data import synthetic_faces as sf

IDENTITIES = tuple(range(8))


def _l1(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))))


@pytest.mark.parametrize("size", [32, 64, 128])
def test_render_shape_dtype(size):
    image = sf.render(3, 42.5, size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == sf.BACKGROUND  # plain background in the corners


def test_render_is_deterministic():
    first = sf.render(7, 33.3, 64)
    sf._identity_traits.cache_clear()  # no reliance on cached traits
    np.testing.assert_array_equal(first, sf.render(7, 33.3, 64))


def test_identities_differ():
    faces = [sf.render(i, 30.0, 64) for i in IDENTITIES]
    for i in range(len(faces)):
        for j in range(i + 1, len(faces)):
            assert _l1(faces[i], faces[j]) > 3.0, (i, j)


def test_age_changes_are_smooth_but_large():
    for identity in IDENTITIES[:3]:
        ages = np.arange(0.0, 100.01, 0.5)
        faces = [sf.render(identity, a, 64) for a in ages]
        steps = [_l1(a, b) for a, b in zip(faces[:-1], faces[1:], strict=True)]
        assert max(steps) < 8.0, (identity, max(steps))
        # Continuity: split the largest half-year step into ten; each piece is much smaller (a jump
        # would reappear whole in one piece).
        start = ages[int(np.argmax(steps))]
        fine = [sf.render(identity, start + 0.05 * k, 64) for k in range(11)]
        fine_steps = [_l1(a, b) for a, b in zip(fine[:-1], fine[1:], strict=True)]
        assert max(fine_steps) < 0.35 * max(steps), (identity, start, fine_steps, max(steps))
        assert _l1(faces[40], faces[170]) > 12.0  # 20 vs 85 years: a strong signal


def test_parameters_are_monotone_in_age():
    ages = np.arange(0.0, 100.01, 0.25)
    for identity in IDENTITIES:
        params = [sf.face_parameters(identity, a) for a in ages]

        def series(key, params=params):
            return np.array([p[key] for p in params])

        for key in ("hair_greyness", "wrinkle_strength", "sag", "age_spots", "brow_greyness"):
            assert np.all(np.diff(series(key)) >= 0), key
        child = ages <= 18
        assert np.all(np.diff(series("face_ratio")[child]) > 0)  # the face lengthens
        assert np.all(np.diff(series("eye_height_frac")[child]) < 0)  # eyes move up the head
        assert np.all(np.diff(series("eye_scale")[child]) < 0)  # relatively smaller eyes
        grey = dict(zip(ages, series("hair_greyness"), strict=True))
        assert grey[30.0] == 0.0 and grey[50.0] > 0.1 and grey[80.0] == 1.0
        assert series("wrinkle_strength")[ages == 35.0] < 0.05
        assert series("face_ratio")[0] < 1.05 < 1.2 < series("face_ratio")[ages == 30.0]


def test_hair_greys_in_rendered_pixels():
    """Mean brightness of a patch inside the hair cap rises from 30 to 90, for every identity."""
    size = 64
    gains = []
    for identity in IDENTITIES:
        p = sf.face_parameters(identity, 30.0)
        top = 0.46 - p["face_height_unsagged"] / 2.0  # the renderer's head top (canvas units)
        rows = slice(int((top + 0.015) * size), int((top + 0.06) * size))
        cols = slice(int(0.44 * size), int(0.56 * size))
        brightness = [sf.render(identity, a, size)[rows, cols].mean() for a in (30, 50, 70, 90)]
        assert np.all(np.diff(brightness) > 0), (identity, brightness)
        gains.append(brightness[-1] - brightness[0])
    assert np.mean(gains) > 60.0


def test_face_drifts_further_from_its_30_year_old_self():
    """Pixel distance (face box) from the age-30 render grows with age: wrinkles, sag, grey."""
    for identity in IDENTITIES[:4]:
        base = sf.render(identity, 30.0, 64)[16:56, 14:50]
        dists = [_l1(sf.render(identity, a, 64)[16:56, 14:50], base) for a in (40, 55, 70, 85)]
        assert np.all(np.diff(dists) > 0), (identity, dists)


def test_config_names_are_derived_and_distinct():
    a = sf.SyntheticFacesConfig(size=64, num_train=4000, num_test_identities=32)
    assert a.name == "s64_n4000_t32_a5-15-25-35-45-55-65-75-85"
    b = sf.SyntheticFacesConfig(size=64, num_train=4000, num_test_identities=32, test_ages=(5, 15))
    c = sf.SyntheticFacesConfig(size=32, num_train=4000, num_test_identities=32)
    assert len({a.name, b.name, c.name}) == 3
    long_ages = sf.SyntheticFacesConfig(test_ages=tuple(range(0, 100, 3)))
    assert long_ages.name == sf.SyntheticFacesConfig(test_ages=tuple(range(0, 100, 3))).name
    assert len(long_ages.name) < 48


def test_ordered_map_pool_matches_serial(monkeypatch):
    jobs = [(i, i, float(i), 32) for i in range(6)]
    serial = list(map(sf._render_png, jobs))
    monkeypatch.setattr(sf, "_MIN_JOBS_FOR_POOL", 1)
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: ordered_map never uses a pool")
    assert list(sf.ordered_map(sf._render_png, jobs, chunksize=2)) == serial


def test_builder_records(tmp_path):
    ages = (10, 70)
    config = sf.SyntheticFacesConfig(size=32, num_train=12, num_test_identities=2, test_ages=ages)
    builder = sf.SyntheticFaces(config=config, data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    train = builder.as_data_source("train")
    test = builder.as_data_source("test")
    assert len(train) == 12 and len(test) == 4

    train_records = sorted((train[i] for i in range(len(train))), key=lambda r: r["index"])
    assert [int(r["identity"]) for r in train_records] == list(range(12))
    for r in train_records[:3]:
        assert r["age"] == np.float32(sf.train_age(int(r["identity"])))
        np.testing.assert_array_equal(r["image"], sf.render(int(r["identity"]), r["age"], 32))
    ages = [r["age"] for r in train_records]
    assert 0.0 <= min(ages) and max(ages) <= 100.0 and len(set(ages)) == 12

    test_records = sorted((test[i] for i in range(len(test))), key=lambda r: r["index"])
    assert [(int(r["identity"]), float(r["age"])) for r in test_records] == [
        (sf.TEST_IDENTITY_OFFSET, 10.0),
        (sf.TEST_IDENTITY_OFFSET, 70.0),
        (sf.TEST_IDENTITY_OFFSET + 1, 10.0),
        (sf.TEST_IDENTITY_OFFSET + 1, 70.0),
    ]
    r = test_records[3]
    np.testing.assert_array_equal(r["image"], sf.render(int(r["identity"]), 70.0, 32))

    with open(os.path.join(builder.data_dir, sf.REPORT_FILENAME)) as f:
        report = json.load(f)
    assert report["kept"] == {"train": 12, "test": 4} and report["skipped"] == {}
