"""Built-in street/landscape scenes with known semantics, in two styles, and their TFDS builder.

A scene is a semantic layout (`render_layout`) rendered as a "photo" (`render_photo`):

- the layout is a class-id map: sky above a random horizon, grass below it, sometimes a lake, a road
  narrowing towards a vanishing point on the horizon, a few rectangular buildings standing on the
  horizon and blobby trees in front;
- each class has its own colour statistics and texture (sky gradient with clouds, grass noise, brick
  courses with a window grid, foliage blotches, asphalt with a dashed lane mark, rippled water);
- style "A" is a summer day, style "B" the same layout in winter at dusk (overcast sky, snow instead of
  grass, wet dark asphalt, stone walls with lit windows, snowy conifers, ice with cracks).

So the same `(layout, seed)` gives a pix2pix pair (`colorize_labels(labels)` -> photo) and a CycleGAN
pair (style A -> style B) whose true translation is known for every test image, and
`ganjax.evaluation.scene_labels` can score a generated photo against the layout (an FCN-score
analogue). Everything is numpy + PIL, deterministic given the seed, a few ms per 128 px scene.

`SyntheticScenes` is the TFDS builder (`synthetic_scenes`, array_record): train and test splits of
`photo_a`, `photo_b`, `label_image`, `labels` and `index`. Records are stored in index order
(`disable_shuffling`), so record i of a split is scene i: the unpaired pipeline takes domain A from
even and domain B from odd train scenes, which makes CycleGAN training genuinely unpaired.
"""

from __future__ import annotations

import dataclasses
import io
import time

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ganjax.data.synthetic_faces import ordered_map, write_report

SCENE_CLASSES = ("sky", "grass", "road", "building", "tree", "water")
SKY, GRASS, ROAD, BUILDING, TREE, WATER = range(len(SCENE_CLASSES))
NUM_CLASSES = len(SCENE_CLASSES)
# Label-map colours, after the Cityscapes palette where the class exists there (sky, terrain, road,
# building, vegetation); water gets a light blue that no other class uses.
CLASS_COLORS = np.array(
    [
        (70, 130, 180),  # sky
        (152, 251, 152),  # grass (Cityscapes "terrain")
        (128, 64, 128),  # road
        (70, 70, 70),  # building
        (107, 142, 35),  # tree (Cityscapes "vegetation")
        (0, 160, 255),  # water
    ],
    dtype=np.uint8,
)
STYLES = ("A", "B")
TEST_SEED_OFFSET = 10_000_000  # test scene j has seed TEST_SEED_OFFSET + j: disjoint from train's 0..N-1


def scene_seed(split: str, index: int) -> int:
    """The seed of scene `index` of `split` ("train" or "test")."""
    return int(index) + (TEST_SEED_OFFSET if split == "test" else 0)


# ---------------------------------------------------------------------------------------------
# Layout.
# ---------------------------------------------------------------------------------------------


def render_layout(seed: int, size: int) -> np.ndarray:
    """A random semantic layout: uint8 (size, size) of class ids (indices into SCENE_CLASSES).

    Painted back to front: sky / grass split at the horizon, a lake, buildings on the horizon, the road
    in perspective, trees in front. All geometry is in fractions of `size`, so one seed gives the same
    scene at any resolution (up to rasterisation).
    """
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    rng = np.random.default_rng([int(seed), 0x5CE7E])
    u = rng.uniform
    s = float(size)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres

    horizon = u(0.35, 0.55) * s
    labels = np.where(y < horizon, SKY, GRASS).astype(np.uint8)

    if u() < 0.4:  # a lake, clipped to below the horizon
        cx, cy = u(0.1, 0.9) * s, horizon + u(0.12, 0.3) * s
        rx, ry = u(0.18, 0.4) * s, u(0.06, 0.14) * s
        lake = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1.0
        labels[lake & (y >= horizon)] = WATER

    for _ in range(int(rng.integers(0, 5))):  # buildings standing on (or just below) the horizon
        w, h = u(0.1, 0.28) * s, u(0.12, 0.4) * s
        x0, bottom = u(-0.1, 0.95) * s, horizon + u(0.0, 0.05) * s
        labels[(x >= x0) & (x < x0 + w) & (y >= bottom - h) & (y < bottom)] = BUILDING

    if u() < 0.85:  # road: a trapezoid from a vanishing point on the horizon to the bottom edge
        vx = u(0.3, 0.7) * s
        bx = vx + u(-0.3, 0.3) * s
        half = u(0.18, 0.4) * s
        t = np.clip((y - horizon) / (s - horizon), 0.0, None)
        centre = vx + t * (bx - vx)
        labels[(y >= horizon) & (np.abs(x - centre) < np.maximum(t * half, 0.4))] = ROAD

    for _ in range(int(rng.integers(0, 5))):  # trees: unions of circles, bigger when nearer (lower)
        base = horizon + u(-0.02, 0.3) * s
        r = (0.04 + 0.12 * (base - horizon) / s + u(0.0, 0.05)) * s
        cx, cy = u(0.0, 1.0) * s, base - r
        blob = np.zeros_like(labels, dtype=bool)
        for _ in range(int(rng.integers(3, 6))):
            ox, oy, rr = u(-0.6, 0.6) * r, u(-0.6, 0.4) * r, u(0.5, 0.9) * r
            blob |= (x - cx - ox) ** 2 + (y - cy - oy) ** 2 < rr**2
        labels[blob] = TREE
    return labels


def colorize_labels(labels: np.ndarray) -> np.ndarray:
    """Class-id map (..., H, W) -> uint8 (..., H, W, 3) label image (the pix2pix input)."""
    return CLASS_COLORS[np.asarray(labels)]


# ---------------------------------------------------------------------------------------------
# Photo rendering: each class paints its own pixels with its own texture. Painters receive the
# pixel coordinates (ys, xs) of their class (int arrays of length n) and return float (n, 3) RGB;
# each class draws from its own random stream, so one class's presence never changes another's look.
# ---------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> np.ndarray:
    """Value noise in about [-1, 1]: a (rows, cols) grid of uniforms upsampled bilinearly to size^2.

    Fewer columns than rows stretches the features horizontally.
    """
    grid = rng.uniform(-1.0, 1.0, (cells[0] + 1, cells[1] + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BILINEAR))


def _rgb(color) -> np.ndarray:
    return np.asarray(color, np.float32)


def _normal(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(0.0, 1.0, (n, 1)).astype(np.float32)


def _paint_sky(rng, size, ys, xs, labels, style):
    if style == "A":  # deep blue at the top to pale blue at the horizon, with soft white clouds
        top, low = _rgb((62, 122, 212)) + rng.uniform(-12, 12, 3), _rgb((165, 200, 236))
        cloud_color, cloud_strength = _rgb((236, 238, 244)), 0.65
    else:  # overcast lavender-grey
        top, low = _rgb((168, 168, 186)) + rng.uniform(-8, 8, 3), _rgb((206, 200, 212))
        cloud_color, cloud_strength = _rgb((150, 148, 162)), 0.35
    t = np.clip(ys / (0.55 * size), 0.0, 1.0)[:, None]
    image = top + (low - top) * t
    cloud = _smooth_noise(rng, size, (6, 3))[ys, xs]
    cloud = np.clip(cloud * 1.6 - 0.4, 0.0, 1.0)[:, None] * cloud_strength
    return image + (cloud_color - image) * cloud


def _paint_grass(rng, size, ys, xs, labels, style):
    patches = _smooth_noise(rng, size, (6, 6))[ys, xs][:, None]
    fine = _normal(rng, len(ys))
    if style == "A":  # green with grainy blades and lighter/darker patches
        base = _rgb((88, 152, 56)) + rng.uniform(-10, 10, 3)
        return base + patches * _rgb((14, 20, 8)) + fine * _rgb((10, 16, 6))
    # snow: near white with blue-grey drifts and a little sparkle
    white, drift = _rgb((234, 238, 246)), _rgb((196, 206, 228))
    return white + (drift - white) * (np.clip(patches, 0.0, 1.0) * 0.4) + fine * 4.0


def _paint_road(rng, size, ys, xs, labels, style):
    grey = rng.uniform(86, 104) if style == "A" else rng.uniform(52, 64)
    image = _rgb((grey, grey, grey + 4)) + _normal(rng, len(ys)) * 7.0
    image += _smooth_noise(rng, size, (5, 5))[ys, xs][:, None] * 5.0
    # Dashed centre line: per row, the centre of the road pixels; a dash every other few rows.
    road = labels == ROAD
    count = road.sum(axis=1)
    centre = (road * np.arange(size)).sum(axis=1) / np.maximum(count, 1)
    width = np.maximum(count * 0.05, 0.5)
    dashed_row = ((np.arange(size) // max(2, size // 24)) % 2 == 0) & (count > 4)
    line = (np.abs(xs - centre[ys]) < width[ys]) & dashed_row[ys]
    image[line] = _rgb((232, 232, 222)) if style == "A" else _rgb((196, 168, 70))
    return image


def _paint_building(rng, size, ys, xs, labels, style):
    tint = (_smooth_noise(rng, size, (3, 3))[ys, xs][:, None] + 1.0) / 2.0
    if style == "A":  # brick red to sandstone
        lo, hi = _rgb((150, 66, 48)), _rgb((188, 160, 118))
    else:  # dull stone in the dusk light
        lo, hi = _rgb((104, 96, 94)), _rgb((132, 118, 104))
    wall = lo + (hi - lo) * tint + _normal(rng, len(ys)) * 5.0
    # Brick courses: darker mortar rows and staggered joints.
    course = max(2, size // 24)
    mortar = (ys % course == 0) | ((xs + ((ys // course) % 2) * course) % (2 * course) == 0)
    wall[mortar] *= 0.78
    # Window grid: one window in the middle of each cell.
    cell = max(4, size // 10)
    cy, cx = ys % cell, xs % cell
    window = (cy >= 0.3 * cell) & (cy < 0.8 * cell) & (cx >= 0.25 * cell) & (cx < 0.75 * cell)
    if style == "A":  # dark glass
        wall[window] = _rgb((34, 44, 74))
    else:  # most windows lit warm yellow, some dark
        n = size // cell + 2
        lit = (rng.uniform(size=(n, n)) < 0.7)[ys // cell, xs // cell][:, None]
        glass = np.where(lit, _rgb((240, 204, 96)), _rgb((30, 30, 44)))
        wall[window] = glass[window]
    return wall


def _paint_tree(rng, size, ys, xs, labels, style):
    cells = max(2, size // 6)
    blotch = _smooth_noise(rng, size, (cells, cells))[ys, xs][:, None]
    fine = _normal(rng, len(ys))
    if style == "A":  # dark leafy green, blotchy
        base = _rgb((38, 98, 36)) + rng.uniform(-8, 8, 3)
        return base + blotch * _rgb((22, 32, 14)) + fine * _rgb((8, 12, 6))
    # dark blue-green conifers with snow speckles
    image = _rgb((28, 54, 44)) + blotch * _rgb((10, 16, 12)) + fine * 6.0
    image[rng.uniform(size=len(ys)) < 0.18] = _rgb((222, 228, 238))
    return image


def _paint_water(rng, size, ys, xs, labels, style):
    fine = _normal(rng, len(ys))
    if style == "A":  # blue with horizontal ripples
        phase = ys * (2.0 * np.pi / max(3.0, size / 21.0)) + 2.5 * _smooth_noise(rng, size, (4, 2))[ys, xs]
        return _rgb((38, 78, 134)) + np.sin(phase)[:, None] * _rgb((12, 16, 20)) + fine * 4.0
    # pale ice with dark cracks
    crack = np.abs(_smooth_noise(rng, size, (5, 5))[ys, xs]) < 0.06
    image = _rgb((168, 198, 214)) + fine * 4.0
    image[crack] = _rgb((104, 124, 138))
    return image


_PAINTERS = {
    SKY: _paint_sky,
    GRASS: _paint_grass,
    ROAD: _paint_road,
    BUILDING: _paint_building,
    TREE: _paint_tree,
    WATER: _paint_water,
}


def render_photo(labels: np.ndarray, seed: int, style: str = "A") -> np.ndarray:
    """A photo of the layout `labels` (uint8 (S, S) class ids) -> uint8 (S, S, 3).

    Each class gets its own colour statistics and texture (see the module docstring); `seed` fixes the
    per-scene variations (tints, noise), `style` is "A" (summer day) or "B" (winter dusk). Deterministic:
    the same arguments give the same pixels.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    labels = np.asarray(labels)
    size = labels.shape[0]
    if labels.shape != (size, size):
        raise ValueError(f"labels must be square (S, S), got {labels.shape}")
    image = np.zeros((size, size, 3), np.float32)
    for cls, paint in _PAINTERS.items():
        ys, xs = np.nonzero(labels == cls)
        if len(ys):
            rng = np.random.default_rng([int(seed), STYLES.index(style), cls, 0xF070])
            image[ys, xs] = paint(rng, size, ys, xs, labels, style)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_scene(seed: int, size: int) -> dict[str, np.ndarray]:
    """labels (S, S), label_image, photo_a, photo_b (S, S, 3) uint8 of one scene."""
    labels = render_layout(seed, size)
    return {
        "labels": labels,
        "label_image": colorize_labels(labels),
        "photo_a": render_photo(labels, seed, "A"),
        "photo_b": render_photo(labels, seed, "B"),
    }


# ---------------------------------------------------------------------------------------------
# TFDS builder.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class SyntheticScenesConfig(tfds.core.BuilderConfig):
    """Size and split sizes of a synthetic-scenes build; `name` is derived from the fields.

    size: rendered resolution (pixels, square). num_train / num_test: scenes per split; train scene i
    has seed i, test scene j has seed TEST_SEED_OFFSET + j.
    """

    name: str = ""
    size: int = 64
    num_train: int = 2000
    num_test: int = 200

    def __post_init__(self):
        if self.size < 16 or self.num_train < 2 or self.num_test < 1:
            raise ValueError(f"Invalid synthetic scenes config: {self}")
        if not self.name:
            self.name = f"s{self.size}_n{self.num_train}_t{self.num_test}"
        if self.description is None:
            self.description = f"{self.size}px; {self.num_train} train and {self.num_test} test scenes"


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # build speed over size
    return buf.getvalue()


def _render_example(job: tuple[str, int, int]) -> tuple[int, dict]:
    """(split, index, size) -> (index, example with PNG-encoded images). Runs in pool workers."""
    split, index, size = job
    scene = render_scene(scene_seed(split, index), size)
    example = {k: _png(scene[k]) for k in ("photo_a", "photo_b", "label_image")}
    return index, {**example, "labels": scene["labels"], "index": index}


class SyntheticScenes(tfds.core.GeneratorBasedBuilder):
    """Procedural scenes in two styles with their layouts (module docstring); always built locally.

    Construct with a config: `SyntheticScenes(config=SyntheticScenesConfig(...), data_dir=...,
    file_format="array_record")`. Bump VERSION whenever the renderer changes its pixels.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First renderer."}

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.size
        image = tfds.features.Image(shape=(s, s, 3), encoding_format="png")
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "photo_a": image,
                    "photo_b": image,
                    "label_image": image,
                    "labels": tfds.features.Tensor(shape=(s, s), dtype=np.uint8, encoding="zlib"),
                    "index": tfds.features.Scalar(np.int64),
                }
            ),
            disable_shuffling=True,  # record i is scene i: the unpaired pipeline splits by index parity
        )

    def _num_examples(self, split: str) -> int:
        cfg = self.builder_config
        return cfg.num_train if split == "train" else cfg.num_test

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split: str):
        jobs = [(split, i, self.builder_config.size) for i in range(self._num_examples(split))]
        yield from ordered_map(_render_example, jobs)

    def _download_and_prepare(self, dl_manager, download_config):
        start = time.perf_counter()
        super()._download_and_prepare(dl_manager, download_config)
        write_report(
            self.data_dir,  # the temporary build directory while preparing; renamed on success
            {
                "dataset": "synthetic_scenes",
                "config": self.builder_config.name,
                "kept": {s: self._num_examples(s) for s in ("train", "test")},
                "skipped": {},
                "skipped_examples": {},
                "build_seconds": round(time.perf_counter() - start, 2),
            },
        )
