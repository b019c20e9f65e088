"""Offline datasets: procedurally generated shapes, and scikit-learn's real handwritten digits.

Nothing here downloads. The shapes generator draws each image from its own seed, so a dataset is
a pure function of (name, classes, images per class, size, seed).

- `shapes-source`: 16 shape classes, the large and varied source set the harness pretrains its own
  backbone on (standing in for ImageNet on an offline machine);
- `shapes`: 6 *other* shape classes rendered the same way: a target similar to the source;
- `digits`: scikit-learn's 1,797 real 8x8 scans of handwritten digits, upscaled: a target
  dissimilar to the source (grey strokes, no filled shapes, no colour).
"""

from __future__ import annotations

import numpy as np

# Shape masks on normalised coordinates (u, v in about [-1, 1]) after rotation and scaling.


def _polar(u, v):
    return np.hypot(u, v), np.arctan2(v, u)


def _polygon(n):
    def mask(u, v):
        r, t = _polar(u, v)
        sector = np.mod(t, 2 * np.pi / n) - np.pi / n
        return r < np.cos(np.pi / n) / np.cos(sector)

    return mask


def _star(n, inner=0.45):
    def mask(u, v):
        r, t = _polar(u, v)
        phase = np.abs(np.mod(t * n / (2 * np.pi), 1.0) - 0.5) * 2  # 1 at tips, 0 between
        return r < inner + (1 - inner) * phase

    return mask


SHAPES = {
    # source classes
    "circle": lambda u, v: np.hypot(u, v) < 1,
    "square": lambda u, v: np.maximum(abs(u), abs(v)) < 0.85,
    "triangle": _polygon(3),
    "ring": lambda u, v: (np.hypot(u, v) < 1) & (np.hypot(u, v) > 0.6),
    "cross": lambda u, v: ((abs(u) < 0.28) & (abs(v) < 1)) | ((abs(v) < 0.28) & (abs(u) < 1)),
    "star5": _star(5),
    "hexagon": _polygon(6),
    "ellipse": lambda u, v: (u / 1.0) ** 2 + (v / 0.45) ** 2 < 1,
    "bar": lambda u, v: (abs(u) < 1) & (abs(v) < 0.2),
    "half_disk": lambda u, v: (np.hypot(u, v) < 1) & (v > 0),
    "frame": lambda u, v: (np.maximum(abs(u), abs(v)) < 0.9) & (np.maximum(abs(u), abs(v)) > 0.6),
    "crescent": lambda u, v: (np.hypot(u, v) < 1) & (np.hypot(u - 0.45, v) > 0.75),
    "two_dots": lambda u, v: (np.hypot(u - 0.55, v) < 0.38) | (np.hypot(u + 0.55, v) < 0.38),
    "l_shape": lambda u, v: ((abs(u + 0.6) < 0.3) & (abs(v) < 1)) | ((abs(v - 0.7) < 0.3) & (abs(u) < 0.9)),
    "star8": _star(8, 0.55),
    "heart": lambda u, v: ((u**2 + (-v * 1.1) ** 2 - 0.6) ** 3 - u**2 * (-v * 1.1) ** 3) < 0,
    # target classes (disjoint from the source)
    "pentagon": _polygon(5),
    "t_shape": lambda u, v: ((abs(u) < 0.25) & (abs(v + 0.15) < 0.85)) | ((abs(v - 0.7) < 0.25) & (abs(u) < 0.9)),
    "star4": _star(4, 0.35),
    "tri_ring": lambda u, v: _polygon(3)(u, v) & ~_polygon(3)(u * 1.9, v * 1.9),
    "three_dots": lambda u, v: (
        (np.hypot(u, v - 0.6) < 0.33) | (np.hypot(u - 0.55, v + 0.35) < 0.33) | (np.hypot(u + 0.55, v + 0.35) < 0.33)
    ),
    "arc": lambda u, v: (np.hypot(u, v) < 1) & (np.hypot(u, v) > 0.65) & (v > -0.1),
}
SOURCE_CLASSES = list(SHAPES)[:16]
TARGET_CLASSES = list(SHAPES)[16:]


def render_shape(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image: a randomly coloured, scaled, rotated, shifted shape on a noisy background."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    xs, ys = (xs + 0.5) / size * 2 - 1, (ys + 0.5) / size * 2 - 1
    scale = rng.uniform(0.45, 0.8)
    angle = rng.uniform(0, 2 * np.pi)
    cx, cy = rng.uniform(-0.25, 0.25, size=2)
    x, y = (xs - cx) / scale, (ys - cy) / scale
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    mask = SHAPES[shape](u, v)
    # Background: a random colour with a gentle gradient and noise; foreground contrasts with it.
    # The shape is always brighter than the background (as a lit object on a darker scene), which
    # keeps the task learnable from a few thousand images while colours still vary freely.
    bg = rng.uniform(0.0, 0.45, size=3)
    fg = rng.uniform(0.55, 1.0, size=3)
    gradient = (xs * rng.uniform(-0.15, 0.15) + ys * rng.uniform(-0.15, 0.15))[..., None]
    img = np.where(mask[..., None], fg, bg) + gradient + rng.normal(0, 0.06, size=(size, size, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_shapes(classes: list[str], per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(classes) * per_class, size, size, 3), np.uint8)
    labels = np.empty(len(classes) * per_class, np.int64)
    for c, shape in enumerate(classes):
        # Seed per (class, seed) so adding classes never changes the others' images.
        rng = np.random.default_rng([seed, c, sum(map(ord, shape))])
        for i in range(per_class):
            images[c * per_class + i] = render_shape(shape, size, rng)
            labels[c * per_class + i] = c
    return images, labels


def make_digits(size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's real digit scans (0-16 grey levels, 8x8) as RGB uint8 at `size` px."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = (bunch.images / 16.0 * 255).astype(np.float32)
    # Bilinear upscaling through PIL keeps strokes smooth instead of blocky.
    from PIL import Image

    up = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BILINEAR)) for g in grey])
    rgb = np.repeat(np.clip(up, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    return rgb, bunch.target.astype(np.int64), [str(d) for d in bunch.target_names]


def load_builtin(name: str, size: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 NHWC, labels int64, class names) of a builtin dataset."""
    if name == "digits":
        return make_digits(size)
    classes = SOURCE_CLASSES if name == "shapes-source" else TARGET_CLASSES
    images, labels = make_shapes(classes, per_class, size, seed)
    return images, labels, list(classes)


BUILTIN = {
    "shapes-source": "16 generated shape classes (source for the harness's own pretraining)",
    "shapes": "6 other generated shape classes (a target similar to shapes-source)",
    "digits": "scikit-learn's 1,797 real handwritten digit scans, 10 classes (a dissimilar target)",
}
