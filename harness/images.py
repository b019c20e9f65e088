"""Image files to pixels without TensorFlow: the decoder of every framework but Keras.

`decode_image` gives what the Keras side's decoder gives (harness/frameworks/keras/data.py:
`tf.io.decode_image`, then `tf.image.resize` bilinear, clip, uint8 cast), so a torch trial sees
the images a Keras trial sees. It decodes with Pillow and resizes with NumPy the way TensorFlow 2
resizes by default: bilinear, half-pixel centres, no antialiasing, float32 arithmetic in
TensorFlow's order, then truncation to uint8. NumPy and Pillow only: a process that never imports
TensorFlow (a torch trial, preflight on a machine without TensorFlow) reads images with it.

PNG, GIF, BMP and JPEG give the same pixels as the Keras side, bit for bit (tests/test_images.py):
a JPEG by libjpeg's accurate integer inverse transform on both sides (Pillow has no other; the
Keras side asks TensorFlow for it, `decode_jpeg(dct_method="INTEGER_ACCURATE")`).

    >>> pixels = read_image("cat.jpg", (224, 224))   # uint8 (224, 224, 3)
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

DECODER_VERSION = "numpy-bilinear-1"  # bump when what `decode_image` gives changes: files read before are read again

# 16-bit modes Pillow opens (grayscale PNG): TensorFlow keeps the high byte (libpng's strip_16).
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")


def to_rgb(image) -> np.ndarray:
    """A Pillow image -> uint8 (height, width, 3), as `tf.io.decode_image(channels=3)` gives it:
    grey is repeated into three channels, an alpha channel is dropped (not composited), a palette
    is looked up, 16-bit samples keep their high byte. An animation gives its first frame."""
    if image.mode in _SIXTEEN_BIT:
        grey = (np.asarray(image, np.uint32) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, np.uint8)


def _weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TensorFlow's bilinear interpolation weights along one axis (resize_bilinear_op.cc,
    half-pixel centres): for each output index, the lower and upper source index and the weight
    of the upper one, in float32 as TensorFlow computes them."""
    scale = np.float32(in_size) / np.float32(out_size)
    centre = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(centre)
    lower = np.maximum(floor, 0).astype(np.int64)
    upper = np.minimum(np.ceil(centre), in_size - 1).astype(np.int64)
    return lower, upper, (centre - floor).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(height, width, channels) -> float32 (size[0], size[1], channels), as `tf.image.resize(image,
    size)` (bilinear, antialias off) computes it: interpolate along the width in each of the two
    source rows, then between the rows, each as `a + (b - a) * weight` in float32."""
    pixels = np.asarray(image, np.float32)
    y_low, y_high, y_weight = _weights(pixels.shape[0], size[0])
    x_low, x_high, x_weight = _weights(pixels.shape[1], size[1])
    x_weight = x_weight[None, :, None]
    top_rows, bottom_rows = pixels[y_low], pixels[y_high]
    top = top_rows[:, x_low] + (top_rows[:, x_high] - top_rows[:, x_low]) * x_weight
    bottom = bottom_rows[:, x_low] + (bottom_rows[:, x_high] - bottom_rows[:, x_low]) * x_weight
    return top + (bottom - top) * y_weight[:, None, None]


def decode_image(raw: bytes, size: tuple[int, int]) -> np.ndarray:
    """An image file's bytes -> uint8 (size[0], size[1], 3), as the Keras side's `decode_image`
    gives it. Raises on bytes Pillow cannot read (OSError, ValueError and their kin)."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as image:
        pixels = to_rgb(image)
    resized = resize_bilinear(pixels, size)
    # TensorFlow's clip, then its float -> uint8 cast, which truncates towards zero.
    return np.clip(resized, 0, 255).astype(np.uint8)


def read_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """The image file at `path`, decoded and resized (`decode_image`)."""
    return decode_image(Path(path).read_bytes(), size)


def read_images(paths, size: tuple[int, int], out: np.ndarray | None = None, threads: int = 4) -> np.ndarray:
    """The image files at `paths`, decoded in `threads` threads (Pillow and NumPy release the
    interpreter lock while they work) into `out` (uint8 (n, size[0], size[1], 3)), in order."""
    paths = list(paths)
    if out is None:
        out = np.empty((len(paths), *size, 3), np.uint8)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for at, pixels in enumerate(pool.map(lambda p: read_image(p, size), paths)):
            out[at] = pixels
    return out


def undecodable(paths: list[str], size: tuple[int, int], threads: int = 4) -> list[str]:
    """The files among `paths` that `read_image` fails on, in their order."""

    def fails(path: str) -> bool:
        try:
            read_image(path, size)
        except Exception:  # noqa: BLE001 - any failure to read or decode makes the file unusable
            return True
        return False

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return [p for p, bad in zip(paths, pool.map(fails, paths)) if bad]
