"""Image grids and age-progression strips as uint8 arrays and PNG files."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float images in [-1, 1] (any leading shape, ..., H, W, 3) -> uint8 in [0, 255]."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(rows: np.ndarray, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """(R, C, H, W, 3) uint8 -> one (R*(H+p)+p, C*(W+p)+p, 3) uint8 picture."""
    num_rows, num_cols, h, w, c = rows.shape
    grid = np.full(
        (num_rows * (h + padding) + padding, num_cols * (w + padding) + padding, c),
        pad_value,
        dtype=np.uint8,
    )
    for r in range(num_rows):
        for col in range(num_cols):
            y, x = padding + r * (h + padding), padding + col * (w + padding)
            grid[y : y + h, x : x + w] = rows[r, col]
    return grid


def progression_grid(inputs: np.ndarray, outputs: np.ndarray, target_ages, input_ages=None) -> np.ndarray:
    """An age-progression picture: one row per face, the input then one column per target age.

    inputs (R, H, W, 3) and outputs (R, A, H, W, 3) float in [-1, 1]; target_ages (A,) label the
    columns in a header strip; input_ages (R,), when known, are not drawn (they vary per row).
    Returns uint8 (H', W', 3).
    """
    del input_ages
    rows = np.concatenate([inputs[:, None], outputs], axis=1)
    grid = image_grid(to_uint8(rows))
    return _with_header(grid, ["input"] + [f"{a:g}" for a in target_ages], inputs.shape[2])


def _with_header(grid: np.ndarray, labels: list[str], cell: int, padding: int = 2) -> np.ndarray:
    header_h = 14
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + header_h), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (0, header_h))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(labels):
        draw.text((padding + i * (cell + padding) + 2, 1), label, fill=(0, 0, 0))
    return np.asarray(canvas)


def save_png(image: np.ndarray, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)
    return path
