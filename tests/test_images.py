"""harness/images.py: Pillow and NumPy decode and resize as TensorFlow does (harness/frameworks/
keras/data.py decode_image), on generated files of odd sizes in each format the harness reads."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from harness import images

tf = pytest.importorskip("tensorflow")


def encoded(array: np.ndarray, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **options)
    return out.getvalue()


def samples() -> dict[str, bytes]:
    """Noise and smooth gradients of odd sizes, in every format and colour mode the decoders meet."""
    rng = np.random.default_rng(0)
    found = {}
    for h, w in [(17, 23), (64, 37), (5, 9), (32, 32)]:
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ramp = (np.linspace(0, 255, h)[:, None, None] * np.linspace(0.2, 1, w)[None, :, None] * [1, 0.7, 0.4]).astype(np.uint8)
        for kind, rgb in (("noise", noise), ("ramp", ramp)):
            grey = np.asarray(Image.fromarray(rgb).convert("L"))
            alpha = np.dstack([rgb, rng.integers(0, 256, (h, w), dtype=np.uint8)])
            name = f"{kind}{h}x{w}"
            found[f"{name}.png"] = encoded(rgb, "PNG")
            found[f"{name}.grey.png"] = encoded(grey, "PNG")
            found[f"{name}.rgba.png"] = encoded(alpha, "PNG")
            found[f"{name}.16bit.png"] = encoded((rgb[:, :, 0].astype(np.uint16) * 257 + 3).astype(np.uint16), "PNG")
            found[f"{name}.palette.png"] = encoded(np.asarray(Image.fromarray(rgb).convert("P")), "PNG")
            found[f"{name}.gif"] = encoded(rgb, "GIF")
            found[f"{name}.bmp"] = encoded(rgb, "BMP")
            found[f"{name}.jpg"] = encoded(rgb, "JPEG", quality=90)
            found[f"{name}.420.jpg"] = encoded(rgb, "JPEG", quality=75, subsampling=2)
            found[f"{name}.grey.jpg"] = encoded(grey, "JPEG")
    return found


SIZES = [(32, 32), (24, 24), (96, 96), (45, 17)]


def accurate_tf_decode(raw: bytes, size) -> np.ndarray:
    """The Keras side's decode_image with TensorFlow's accurate JPEG transform (INTEGER_ACCURATE, the
    one Pillow's libjpeg uses) instead of tf.io.decode_image's fast one."""
    img = tf.io.decode_jpeg(raw, channels=3, dct_method="INTEGER_ACCURATE")
    return tf.cast(tf.clip_by_value(tf.image.resize(img, size), 0, 255), tf.uint8).numpy()


def test_every_pixel_matches_tensorflows_decode_and_resize():
    from harness.frameworks.keras.data import decode_image

    for name, raw in samples().items():
        for size in SIZES:
            ours = images.decode_image(raw, size)
            assert ours.dtype == np.uint8 and ours.shape == (*size, 3)
            np.testing.assert_array_equal(ours, decode_image(raw, size).numpy(), err_msg=f"{name} at {size}")
            if name.endswith(".jpg"):  # the Keras side is TensorFlow's accurate transform, as it says
                np.testing.assert_array_equal(ours, accurate_tf_decode(raw, size), err_msg=f"{name} at {size}")


def test_the_resize_is_tensorflows_bilinear_with_half_pixel_centres():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (13, 29, 3)).astype(np.uint8)
    for size in [(7, 50), (13, 29), (40, 3), (1, 1)]:
        np.testing.assert_array_equal(images.resize_bilinear(pixels, size), tf.image.resize(pixels, size).numpy())


def test_undecodable_lists_the_files_the_decoder_cannot_read(tmp_path):
    good, empty, junk = tmp_path / "good.png", tmp_path / "empty.png", tmp_path / "junk.jpg"
    good.write_bytes(encoded(np.zeros((4, 4, 3), np.uint8), "PNG"))
    empty.write_bytes(b"")
    junk.write_bytes(b"GIF89a not really")
    paths = [str(good), str(empty), str(junk), str(tmp_path / "missing.png")]
    assert images.undecodable(paths, (8, 8)) == paths[1:]
    out = images.read_images([str(good)] * 3, (8, 8))
    assert out.shape == (3, 8, 8, 3) and not out.any()
