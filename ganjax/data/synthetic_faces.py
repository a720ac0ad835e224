"""Built-in procedural faces whose true appearance at every age is known, and their TFDS builder.

`render(identity, age, size)` draws one face: the integer `identity` seeds everything that makes a
person (face shape, skin tone, eyes, hair colour and style, nose, mouth, clothes) and the continuous
`age` in [0, 100] years moves the age-dependent features smoothly:

- childhood (0-18): round short face, large eyes set low on the head, small nose and mouth, rosy
  cheeks, sparse hair on babies; the lower face lengthens towards the adult proportions;
- hair greys from about 35 and is white by about 80 (eyebrows follow, more slowly);
- forehead lines, crow's feet, nasolabial folds and under-eye bags grow after about 40;
- the jaw sags into jowls, lips thin and age spots appear from about 55.

Every attribute is a continuous (C1) function of age, so renders change smoothly, and the whole
picture is a plain neutral background with the face centred, so a small GAN can learn the mapping.
`face_parameters(identity, age)` returns the attributes the renderer draws from (for tests and
for anyone who wants to check an age-monotone property).

`SyntheticFaces` is the TFDS builder (`synthetic_faces`, array_record) over these renders: the
train split holds one face per identity at a random age (unpaired, like real data), the test split
holds held-out identities at every age of a fixed list (so the true aged face is known).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import multiprocessing
import os
import time

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

BACKGROUND = (128, 134, 140)  # one neutral grey-blue for every face
TEST_IDENTITY_OFFSET = 10_000_000  # test identity j is 10_000_000 + j: never a train identity
MAX_AGE = 100.0

_SKIN_LIGHT = np.array([238, 204, 178], np.float64)
_SKIN_DARK = np.array([112, 76, 54], np.float64)
_HAIR_COLORS = (
    (28, 24, 22),  # black
    (58, 40, 28),  # dark brown
    (102, 70, 44),  # brown
    (150, 112, 72),  # light brown
    (206, 170, 104),  # blonde
    (150, 66, 34),  # auburn / red
)
_HAIR_WHITE = np.array([236, 236, 232], np.float64)
_IRIS_COLORS = (
    (72, 46, 26),  # brown
    (42, 28, 20),  # dark brown
    (112, 78, 40),  # hazel
    (62, 112, 164),  # blue
    (78, 124, 82),  # green
    (104, 114, 124),  # grey
)
_SHIRT_COLORS = (
    (52, 72, 120),
    (150, 52, 52),
    (60, 110, 70),
    (200, 200, 196),
    (40, 40, 44),
    (184, 142, 60),
    (110, 70, 130),
    (70, 130, 150),
)
HAIR_STYLES = ("short", "long", "bob", "curly", "side_part")


def _smoothstep(lo: float, hi: float, x: float) -> float:
    """0 below lo, 1 above hi, C1-smooth in between."""
    t = min(max((x - lo) / (hi - lo), 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


def _growth(age: float) -> float:
    """Childhood growth 0 -> 1 over 0-18 years, fastest early; C1 at 18 (zero slope)."""
    t = min(max(age / 18.0, 0.0), 1.0)
    return 1.0 - (1.0 - t) ** 2


def _lerp(a, b, t):
    return a + (b - a) * t


@functools.lru_cache(maxsize=4096)
def _identity_traits(identity: int) -> dict:
    """Everything fixed by the identity, drawn from a generator seeded only by the identity."""
    if identity < 0:
        raise ValueError(f"identity must be a non-negative integer, got {identity}")
    rng = np.random.default_rng([identity, 0x5EED])
    u = rng.uniform
    tone = u(0.0, 1.0)
    skin = _lerp(_SKIN_LIGHT, _SKIN_DARK, tone) + rng.uniform(-8, 8, 3)
    traits = {
        "skin_tone": tone,
        "skin_color": tuple(float(c) for c in np.clip(skin, 0, 255)),
        "face_half_width": u(0.26, 0.29),  # canvas units, adult
        "adult_length_ratio": u(1.22, 1.34),  # adult head height / width
        "jaw_ratio": u(0.5, 0.78),  # chin width relative to the cheek width
        "eye_spacing": u(0.36, 0.43),  # eye centre offset from the midline, x face half width
        "eye_width": u(0.19, 0.24),  # eye half width, x face half width
        "eye_openness": u(0.42, 0.6),  # eye half height / eye half width
        "iris_color": _IRIS_COLORS[rng.integers(len(_IRIS_COLORS))],
        "hair_color": _HAIR_COLORS[rng.integers(len(_HAIR_COLORS))],
        "hair_style": HAIR_STYLES[rng.integers(len(HAIR_STYLES))],
        "hair_volume": u(0.85, 1.2),
        "hair_recession": u(0.0, 1.0),  # how far the hairline recedes with age
        "brow_thickness": u(0.7, 1.25),
        "nose_length": u(0.85, 1.15),
        "nose_width": u(0.85, 1.2),
        "mouth_width": u(0.32, 0.42),  # mouth half width, x face half width
        "lip_thickness": u(0.75, 1.3),
        "lip_redness": u(0.3, 0.6),
        "ear_size": u(0.85, 1.15),
        "shirt_color": _SHIRT_COLORS[rng.integers(len(_SHIRT_COLORS))],
    }
    # Age-spot positions (x in face half widths, y in face-height fractions) and radii.
    num_spots = int(rng.integers(4, 8))
    traits["spots"] = tuple((u(-0.7, 0.7), u(0.12, 0.75), u(0.02, 0.045)) for _ in range(num_spots))
    return traits


def face_parameters(identity: int, age: float) -> dict:
    """The attributes `render` draws for `identity` at `age` (years; clipped to [0, 100]).

    Identity traits (see `_identity_traits`) plus these age-dependent values, all continuous in age:
      growth          0 at birth -> 1 at 18 (childhood proportions)
      face_width      head half width, canvas units (the canvas is 1 x 1)
      face_height     top of skull to chin, canvas units (includes late-life sagging)
      face_ratio      face_height / (2 * face_width): ~1.0 for babies, ~1.3 for adults
      eye_height_frac eye line as a fraction of face_height from the top (low-set in children)
      eye_scale       eye size multiplier (large in children)
      hair_greyness   0 (own colour) -> 1 (white); starts ~35, complete ~80
      hair_rgb        the drawn hair colour
      wrinkle_forehead, wrinkle_eyes, nasolabial, eye_bags, sag, age_spots, cheek_blush  in [0, 1]
      wrinkle_strength mean of the wrinkle terms (non-decreasing in age)
    """
    if not np.isfinite(age):
        raise ValueError(f"age must be finite, got {age}")
    traits = _identity_traits(int(identity))
    age = float(np.clip(age, 0.0, MAX_AGE))
    g = _growth(age)
    grey = _smoothstep(35.0, 80.0, age)
    sag = _smoothstep(55.0, 98.0, age)
    width = traits["face_half_width"] * _lerp(0.93, 1.0, g)
    ratio = _lerp(1.0, traits["adult_length_ratio"], g)
    height_unsagged = 2.0 * width * ratio
    height = height_unsagged + 0.06 * width * sag
    wrinkles = {
        "wrinkle_forehead": _smoothstep(38.0, 78.0, age),
        "wrinkle_eyes": _smoothstep(40.0, 80.0, age),
        "nasolabial": _smoothstep(32.0, 72.0, age),
        "eye_bags": _smoothstep(45.0, 85.0, age),
    }
    hair = _lerp(np.array(traits["hair_color"], np.float64), _HAIR_WHITE, grey)
    return {
        **traits,
        "identity": int(identity),
        "age": age,
        "growth": g,
        "face_width": width,
        "face_height": height,
        "face_height_unsagged": height_unsagged,
        "face_ratio": height / (2.0 * width),
        "eye_height_frac": _lerp(0.58, 0.47, g),
        "eye_scale": _lerp(1.35, 1.0, g),
        "iris_frac": _lerp(0.95, 0.75, g),  # iris radius / eye half height
        "nose_scale": _lerp(0.5, 1.0, g) * (1.0 + 0.08 * sag),
        "mouth_scale": _lerp(0.72, 1.0, g),
        "lip_scale": traits["lip_thickness"] * (1.0 - 0.45 * _smoothstep(30.0, 85.0, age)),
        "lid_droop": _smoothstep(45.0, 95.0, age),
        "hair_amount": 0.35 + 0.65 * _smoothstep(0.0, 5.0, age),  # babies: little hair
        "hair_length": _smoothstep(1.0, 12.0, age),  # long styles grow out in childhood
        "hairline_recession": traits["hair_recession"] * _smoothstep(28.0, 80.0, age),
        "hair_greyness": grey,
        "brow_greyness": 0.8 * _smoothstep(45.0, 90.0, age),
        "hair_rgb": tuple(float(c) for c in hair),
        "cheek_blush": 1.0 - _smoothstep(0.0, 14.0, age),
        "sag": sag,
        "age_spots": _smoothstep(55.0, 90.0, age),
        "skin_dulling": _smoothstep(40.0, 95.0, age),
        **wrinkles,
        "wrinkle_strength": float(np.mean(list(wrinkles.values()))),
    }


# ---------------------------------------------------------------------------------------------
# Drawing. Coordinates are in canvas units (the canvas is 1 x 1) and scaled to pixels at the end,
# so the same geometry renders at any size.
# ---------------------------------------------------------------------------------------------


def _rgb(c) -> tuple[int, int, int]:
    return tuple(int(round(min(max(v, 0.0), 255.0))) for v in c)


def _mix(a, b, t: float):
    return tuple(x + (y - x) * t for x, y in zip(a, b, strict=True))


class _Canvas:
    """PIL drawing in canvas units at `px` pixels per unit."""

    def __init__(self, px: int):
        self.px = px
        self.image = Image.new("RGB", (px, px), BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)

    def pts(self, points):
        return [(x * self.px, y * self.px) for x, y in points]

    def width(self, w: float) -> int:
        return max(1, int(round(w * self.px)))

    def polygon(self, points, color):
        self.draw.polygon(self.pts(points), fill=_rgb(color))

    def ellipse(self, cx, cy, rx, ry, color):
        p = self.px
        self.draw.ellipse(((cx - rx) * p, (cy - ry) * p, (cx + rx) * p, (cy + ry) * p), _rgb(color))

    def line(self, points, color, width: float):
        self.draw.line(self.pts(points), fill=_rgb(color), width=self.width(width), joint="curve")


def _arc(cx, cy, rx, ry, a0, a1, n=9):
    """Points on an ellipse arc from angle a0 to a1 (radians; y points down)."""
    t = np.linspace(a0, a1, n)
    return list(zip(cx + rx * np.cos(t), cy + ry * np.sin(t), strict=True))


def _face_outline(p, cx, top, n=40):
    """Closed head contour: a round cranium over a jaw that tapers to the chin."""
    w, h = p["face_width"], p["face_height"]
    upper = w * _lerp(1.02, 0.96, p["growth"])  # cranium height above the widest line
    mid = top + upper  # the widest line (cheekbones)
    lower = h - upper
    jaw = _lerp(0.82, p["jaw_ratio"], p["growth"]) + 0.12 * p["sag"]  # jowls widen the jaw
    power = _lerp(2.2, 1.5, p["growth"])
    pts = []
    for t in np.linspace(0.0, 2.0 * np.pi, n, endpoint=False):
        c, s = np.cos(t), np.sin(t)
        if s < 0:  # cranium
            pts.append((cx + w * c, mid + upper * s))
        else:  # cheeks to chin: narrower with depth; a little flatter at the chin
            taper = 1.0 - (1.0 - jaw) * s**power
            pts.append((cx + w * c * taper, mid + lower * s**0.9))
    return pts, mid


def _draw_hair_back(cv, p, cx, top, chin, color):
    """Hair behind the head: long, bob and curly styles."""
    w, style = p["face_width"], p["hair_style"]
    vol = p["hair_volume"] * p["hair_amount"]
    if style == "long":
        bottom = _lerp(top + 0.9 * w, chin + 0.55 * w, p["hair_length"])
        rx = w * (1.0 + 0.22 * vol)
        dome = _arc(cx, top + w, rx, w * (1.0 + 0.18 * vol), np.pi, 2.0 * np.pi, 13)
        cv.polygon(dome + [(cx + rx * 1.05, bottom), (cx - rx * 1.05, bottom)], color)
    elif style == "bob":
        bottom = _lerp(top + 0.9 * w, chin - 0.1 * w, p["hair_length"])
        rx = w * (1.0 + 0.25 * vol)
        dome = _arc(cx, top + w, rx, w * (1.0 + 0.2 * vol), np.pi, 2.0 * np.pi, 13)
        cv.polygon(dome + [(cx + rx, bottom), (cx - rx, bottom)], color)
    elif style == "curly":
        r = 0.28 * w * vol + 0.04 * w
        for t in np.linspace(np.pi * 0.92, np.pi * 2.08, 11):
            cv.ellipse(cx + 1.02 * w * np.cos(t), top + w + 1.02 * w * np.sin(t), r, r, color)


def _draw_hair_front(cv, p, cx, top, mid, color):
    """The hair cap over the skull, down to a hairline that rises as the hair recedes."""
    w, style = p["face_width"], p["hair_style"]
    vol = p["hair_volume"] * p["hair_amount"]
    thick = w * (0.05 + 0.12 * vol)
    upper = mid - top
    hairline = top + upper * (0.42 + 0.22 * p["hairline_recession"]) * _lerp(0.7, 1.0, p["growth"])
    side = mid + (0.05 if style in ("short", "side_part") else 0.2) * w
    if style == "bob":
        hairline = top + upper * 0.62  # straight fringe
    outer = _arc(cx, mid, w + thick, upper + thick, np.pi, 2.0 * np.pi, 17)
    # Temples come down at the sides; the forehead edge is an arch at the (receding) hairline.
    inner = [(cx + 0.97 * w, side), (cx + 0.9 * w, _lerp(mid, hairline, 0.6))]
    dip = 0.1 * upper * (1.0 - 2.0 * p["hairline_recession"])  # widow's peak / receding M
    if style == "side_part":
        inner += [(cx + 0.55 * w, hairline - 0.05 * upper), (cx - 0.2 * w, hairline + 0.22 * upper),
                  (cx - 0.75 * w, hairline + 0.12 * upper)]  # fmt: skip
    else:
        inner += [(cx + 0.6 * w, hairline), (cx, hairline + dip), (cx - 0.6 * w, hairline)]
    inner += [(cx - 0.9 * w, _lerp(mid, hairline, 0.6)), (cx - 0.97 * w, side)]
    cv.polygon([(cx - w - thick, side)] + outer + [(cx + w + thick, side)] + inner, color)
    if style == "curly":  # curls over the cap edge
        r = 0.2 * w * vol + 0.03 * w
        for t in np.linspace(np.pi * 1.05, np.pi * 1.95, 7):
            cv.ellipse(cx + w * np.cos(t), mid + upper * np.sin(t), r, r, color)


def _draw_eye(cv, p, ex, ey, side, skin, line_dark):
    """One eye: sclera, iris, pupil, lid line, then the age lines around it."""
    w = p["face_width"]
    rx = p["eye_width"] * w * p["eye_scale"]
    ry = rx * p["eye_openness"] * (1.0 - 0.22 * p["lid_droop"])
    cv.ellipse(ex, ey, rx, ry, (244, 242, 238))
    ir = ry * p["iris_frac"]
    cv.ellipse(ex, ey, ir, ir, p["iris_color"])
    cv.ellipse(ex, ey, ir * 0.45, ir * 0.45, (16, 14, 14))
    cv.ellipse(ex - 0.3 * ir, ey - 0.3 * ir, ir * 0.18, ir * 0.18, (250, 250, 250))
    cv.line(_arc(ex, ey, rx * 1.02, ry * 1.05, np.pi * 1.05, np.pi * 1.95), (40, 30, 28), 0.012)
    # Drooping upper lid fold, crow's feet at the outer corner, bags below.
    fold = _mix(skin, line_dark, 0.35 + 0.4 * p["lid_droop"])
    cv.line(_arc(ex, ey - 0.2 * ry, rx * 1.05, ry * (1.45 + 0.3 * p["lid_droop"]), np.pi * 1.1,
                 np.pi * 1.9), fold, 0.006 + 0.006 * p["lid_droop"])  # fmt: skip
    s = p["wrinkle_eyes"]
    if s > 0:
        col, lw = _mix(skin, line_dark, 0.85 * s), 0.005 + 0.007 * s
        ox = ex + side * rx * 1.12
        for dy in (-0.55, 0.0, 0.55):
            tip = (ox + side * 0.33 * rx, ey + dy * ry * 1.5)
            cv.line([(ox, ey + dy * ry * 0.6), tip], col, lw)
    b = p["eye_bags"]
    if b > 0:
        col = _mix(skin, line_dark, 0.8 * b)
        cv.line(_arc(ex, ey + ry * 0.9, rx * 0.8, ry * 0.9, np.pi * 0.15, np.pi * 0.85), col,
                0.005 + 0.006 * b)  # fmt: skip


def _draw_face(cv: _Canvas, p: dict) -> None:
    w, h = p["face_width"], p["face_height"]
    cx = 0.5
    top = 0.46 - p["face_height_unsagged"] / 2.0  # sagging lengthens the chin, not the skull
    chin = top + h
    skin = np.array(p["skin_color"], np.float64)
    skin = tuple(skin * (1.0 - 0.08 * p["skin_dulling"]) + np.array([4, 2, -6]) * p["skin_dulling"])
    shade = _mix(skin, (0, 0, 0), 0.14)
    line_dark = _mix(skin, (20, 10, 10), 0.6)
    hair = p["hair_rgb"]

    # Shoulders and neck (grow with the child).
    g = p["growth"]
    sw = w * _lerp(1.5, 2.1, g)
    cv.ellipse(cx, chin + _lerp(0.3, 0.42, g) * w + 0.32, sw, 0.32, p["shirt_color"])
    nw = w * _lerp(0.45, 0.52, g)
    cv.polygon([(cx - nw, chin - 0.4 * w), (cx + nw, chin - 0.4 * w), (cx + nw * 1.05, 1.0),
                (cx - nw * 1.05, 1.0)], shade)  # fmt: skip

    _draw_hair_back(cv, p, cx, top, chin, hair)
    outline, mid = _face_outline(p, cx, top)
    ear_y = mid + 0.18 * h
    er = 0.2 * w * p["ear_size"] * _lerp(0.85, 1.0, g) * (1.0 + 0.1 * p["sag"])  # ears keep growing
    for side in (-1, 1):
        cv.ellipse(cx + side * w * 0.97, ear_y, er * 0.65, er, shade)
    cv.polygon(outline, skin)

    # Rosy cheeks in childhood; age spots late.
    eye_y = top + p["eye_height_frac"] * p["face_height_unsagged"]
    if p["cheek_blush"] > 0:
        blush = _mix(skin, (236, 120, 120), 0.35 * p["cheek_blush"])
        for side in (-1, 1):
            cv.ellipse(cx + side * 0.52 * w, eye_y + 0.38 * w, 0.2 * w, 0.13 * w, blush)
    if p["age_spots"] > 0:
        spot = _mix(skin, (110, 72, 40), 0.45 * p["age_spots"])
        for sx, sy, sr in p["spots"]:
            cv.ellipse(cx + sx * w, top + sy * h, sr * w, sr * w * 0.8, spot)

    # Forehead lines between the brows and the hairline.
    fw = p["wrinkle_forehead"]
    if fw > 0:
        col = _mix(skin, line_dark, 0.85 * fw)
        for k in range(3):
            y = eye_y - (0.42 + 0.13 * k) * w
            cv.line(_arc(cx, y + 0.25 * w, 0.48 * w, 0.25 * w, np.pi * 1.25, np.pi * 1.75), col,
                    0.006 + 0.007 * fw)  # fmt: skip

    # Sagging jaw: jowl lines from the mouth corners towards the jaw.
    mouth_y = _lerp(eye_y + 0.55 * w, chin - 0.32 * w, 0.55) + 0.04 * w * p["sag"]
    mw = p["mouth_width"] * w * p["mouth_scale"]
    if p["sag"] > 0:
        col = _mix(skin, line_dark, 0.8 * p["sag"])
        for side in (-1, 1):
            cv.line([(cx + side * mw * 1.1, mouth_y + 0.05 * w),
                     (cx + side * mw * 1.25, mouth_y + 0.3 * w)], col, 0.008)  # fmt: skip

    _draw_hair_front(cv, p, cx, top, mid, hair)

    # Eyebrows follow the hair colour and grey more slowly.
    brow = _mix(_mix(p["hair_color"], (40, 30, 26), 0.4), _HAIR_WHITE, p["brow_greyness"])
    for side in (-1, 1):
        ex = cx + side * p["eye_spacing"] * w
        rx = p["eye_width"] * w * p["eye_scale"]
        cv.line(_arc(ex, eye_y - 0.05 * w, rx * 1.25, 0.2 * w, np.pi * 1.15, np.pi * 1.85),
                brow, 0.016 * p["brow_thickness"])  # fmt: skip
        _draw_eye(cv, p, ex, eye_y, side, skin, line_dark)

    # Nose: a soft shadow line, the tip and the nostrils.
    nl = 0.42 * w * p["nose_length"] * p["nose_scale"] * (1.0 + 0.3 * (p["adult_length_ratio"] - 1))
    nose_y = eye_y + nl
    nwid = 0.14 * w * p["nose_width"] * _lerp(0.8, 1.0, g)
    cv.line([(cx + 0.25 * nwid, eye_y + 0.1 * w), (cx + 0.6 * nwid, nose_y - 0.05 * w)], shade,
            0.008)  # fmt: skip
    cv.ellipse(cx, nose_y - 0.02 * w, nwid * 0.8, nwid * 0.55, _mix(skin, (255, 255, 255), 0.06))
    for side in (-1, 1):
        cv.ellipse(cx + side * nwid * 0.55, nose_y, nwid * 0.28, nwid * 0.16, line_dark)

    # Nasolabial folds: from the nose wings past the mouth corners.
    s = p["nasolabial"]
    if s > 0:
        col = _mix(skin, line_dark, 0.9 * s)
        for side in (-1, 1):
            fold = [(cx + side * nwid * 1.25, nose_y - 0.04 * w),
                    (cx + side * (mw + 0.12 * w), _lerp(nose_y, mouth_y, 0.6)),
                    (cx + side * (mw + 0.1 * w), mouth_y + 0.12 * w)]  # fmt: skip
            cv.line(fold, col, 0.006 + 0.008 * s)

    # Mouth: lips thin with age.
    lips = _mix(skin, (176, 62, 70), p["lip_redness"])
    lt = 0.055 * w * p["lip_scale"] * _lerp(0.85, 1.0, g)
    cv.polygon([(cx - mw, mouth_y), (cx - 0.3 * mw, mouth_y - lt), (cx, mouth_y - 0.7 * lt),
                (cx + 0.3 * mw, mouth_y - lt), (cx + mw, mouth_y)], lips)  # fmt: skip
    cv.ellipse(cx, mouth_y, mw * 0.8, lt * 1.1 + 0.004, lips)
    cv.line([(cx - mw, mouth_y), (cx, mouth_y + 0.15 * lt), (cx + mw, mouth_y)],
            _mix(lips, (40, 10, 10), 0.55), 0.007)  # fmt: skip


def _supersampling(size: int) -> int:
    # 4x for small faces, fewer samples for large ones (the canvas stays <= ~512 px).
    return int(min(4, max(2, 512 // size)))


def render(identity: int, age: float, size: int) -> np.ndarray:
    """The face of `identity` at `age` years (clipped to [0, 100]) as uint8 (size, size, 3).

    Deterministic: the same arguments give the same pixels. Drawn at 2-4x and downsampled with
    LANCZOS for antialiasing.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    params = face_parameters(identity, age)
    canvas = _Canvas(size * _supersampling(size))
    _draw_face(canvas, params)
    image = canvas.image.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Parallel helpers shared by the builders.
# ---------------------------------------------------------------------------------------------

REPORT_FILENAME = "prepare_report.json"  # written next to the records by every builder here
_MIN_JOBS_FOR_POOL = 512  # below this a process pool costs more than it saves


def ordered_map(fn, jobs: list, chunksize: int = 32):
    """Yields fn(job) for each job, in order, using a spawn-process pool when that pays off.

    `fn` must be a module-level function (it is pickled). Spawn, not fork: the caller may already
    hold JAX/TF threads, which fork does not copy safely.
    """
    workers = min(os.cpu_count() or 1, 8)
    if workers < 2 or len(jobs) < _MIN_JOBS_FOR_POOL:
        yield from map(fn, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(fn, jobs, chunksize=chunksize)


def write_report(data_dir, report: dict) -> None:
    with open(os.path.join(os.fspath(data_dir), REPORT_FILENAME), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# TFDS builder.
# ---------------------------------------------------------------------------------------------

DEFAULT_TEST_AGES = (5, 15, 25, 35, 45, 55, 65, 75, 85)


def train_age(identity: int) -> float:
    """The age at which train identity `identity` appears: uniform in [0, 100], seeded by the id."""
    return float(np.random.default_rng([identity, 0xA6E]).uniform(0.0, MAX_AGE))


@dataclasses.dataclass(eq=False)
class SyntheticFacesConfig(tfds.core.BuilderConfig):
    """Size and composition of a synthetic-faces build; `name` is derived from the fields.

    size: rendered resolution (pixels, square). num_train: train identities 0..num_train-1, one
    random age each. num_test_identities / test_ages: test identities TEST_IDENTITY_OFFSET + j, each
    rendered at every age of test_ages.
    """

    name: str = ""
    size: int = 64
    num_train: int = 4000
    num_test_identities: int = 32
    test_ages: tuple[float, ...] = DEFAULT_TEST_AGES

    def __post_init__(self):
        self.test_ages = tuple(float(a) for a in self.test_ages)
        counts = (self.num_train, self.num_test_identities, len(self.test_ages))
        if self.size < 8 or min(counts) < 1:
            raise ValueError(f"Invalid synthetic faces config: {self}")
        if not self.name:
            ages = "-".join(f"{a:g}" for a in self.test_ages)
            if len(ages) > 48:  # long age lists: a short stable hash keeps the directory name sane
                ages = "h" + hashlib.sha1(ages.encode()).hexdigest()[:10]
            self.name = f"s{self.size}_n{self.num_train}_t{self.num_test_identities}_a{ages}"
        if self.description is None:
            self.description = (
                f"{self.size}px; train {self.num_train} identities at random ages; test "
                f"{self.num_test_identities} identities x ages {self.test_ages}"
            )


def _render_png(job: tuple[int, int, float, int]) -> tuple[int, int, float, bytes]:
    """(index, identity, age, size) -> (index, identity, age, PNG bytes). Runs in pool workers."""
    index, identity, age, size = job
    buf = io.BytesIO()
    # compress_level=1: encoding speed matters more than a few percent of file size.
    Image.fromarray(render(identity, age, size)).save(buf, format="PNG", compress_level=1)
    return index, identity, age, buf.getvalue()


class SyntheticFaces(tfds.core.GeneratorBasedBuilder):
    """Procedural faces at known ages (see the module docstring); always built locally.

    Construct with a config: `SyntheticFaces(config=SyntheticFacesConfig(...), data_dir=...,
    file_format="array_record")`. Bump VERSION whenever `render` changes its pixels.
    """

    name = "synthetic_faces"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First renderer."}

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.size
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "age": tfds.features.Scalar(np.float32),
                    "identity": tfds.features.Scalar(np.int64),
                    "index": tfds.features.Scalar(np.int64),  # restores generation order
                }
            ),
        )

    def _jobs(self, split: str) -> list[tuple[int, int, float, int]]:
        cfg = self.builder_config
        if split == "train":
            return [(i, i, train_age(i), cfg.size) for i in range(cfg.num_train)]
        ages = cfg.test_ages
        return [
            (j * len(ages) + k, TEST_IDENTITY_OFFSET + j, age, cfg.size)
            for j in range(cfg.num_test_identities)
            for k, age in enumerate(ages)
        ]

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split: str):
        for index, identity, age, png in ordered_map(_render_png, self._jobs(split)):
            yield index, {"image": png, "age": age, "identity": identity, "index": index}

    def _download_and_prepare(self, dl_manager, download_config):
        start = time.perf_counter()
        super()._download_and_prepare(dl_manager, download_config)
        cfg = self.builder_config
        write_report(
            self.data_dir,  # the temporary build directory while preparing; renamed on success
            {
                "dataset": "synthetic_faces",
                "config": cfg.name,
                "kept": {s: len(self._jobs(s)) for s in ("train", "test")},
                "skipped": {},
                "skipped_examples": {},
                "build_seconds": round(time.perf_counter() - start, 2),
            },
        )
