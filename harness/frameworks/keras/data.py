"""The data's side in TensorFlow: decoding image files, and tf.data pipelines of a split's images
or of cached activations. Which images are in which split is harness/data.py's, framework-free.
"""

from __future__ import annotations

import numpy as np

from harness import data
from harness.data import Dataset, cache_plan, split_files

DECODER_FORMATS = "tf.io.decode_image: JPEG, PNG, GIF, BMP, WebP"  # what `decode_image` reads


def decode_image(raw, size: tuple[int, int]):
    """An image file's bytes -> uint8 (height, width, 3) at `size`: how every image the models see
    is decoded, in training (inside tf.data) and in `harness.predict` (eagerly).

    A JPEG is decoded with libjpeg's accurate inverse transform (`dct_method="INTEGER_ACCURATE"`),
    the one Pillow uses, so a torch trial (harness/images.py) sees the same pixels as a Keras
    trial; `tf.io.decode_image` would take the fast one, a few levels apart."""
    import tensorflow as tf

    img = tf.cond(
        tf.io.is_jpeg(raw),
        lambda: tf.io.decode_jpeg(raw, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(raw, channels=3, expand_animations=False),
    )
    img = tf.image.resize(img, size)
    return tf.cast(tf.clip_by_value(img, 0, 255), tf.uint8)


def tf_dataset(ds: Dataset, indices: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0):
    """A batched, prefetched tf.data pipeline of (uint8 image, label) pairs.

    Images stay uint8 here: each backbone's own preprocess_input runs inside the model.
    In-memory datasets (builtin, TFDS) are sliced. A folder split is decoded once and cached in
    memory when it fits `ds.memory_cache_mib`; otherwise it streams: file names are shuffled
    (every epoch, with the whole split as the buffer: names are small) before decoding, so memory
    holds a few batches, never the split. With `ds.disk_cache_dir` the split is decoded once into a
    file every process shares (`decoded_split`), and each batch reads its rows from it, shuffled
    over the whole split as in memory.
    """
    import tensorflow as tf

    labels = ds.labels[indices]
    if ds.images is not None:
        pipe = tf.data.Dataset.from_tensor_slices((ds.images[indices], labels)).cache()
        if shuffle:
            pipe = pipe.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
        return pipe.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    size = ds.image_size

    def decode(path, label):
        return decode_image(tf.io.read_file(path), (size, size)), label

    files = split_files(ds, indices)
    plan = cache_plan(len(indices), size, ds.memory_cache_mib, ds.disk_cache_dir)
    if plan == "memory":
        pipe = tf.data.Dataset.from_tensor_slices((files, labels)).map(decode, num_parallel_calls=tf.data.AUTOTUNE).cache()
        if shuffle:
            pipe = pipe.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
    elif plan == "disk":
        # One file per split content, whatever the seed or process: the shuffle is over row numbers.
        return rows_pipeline(decoded_split(ds, indices), labels, batch_size, shuffle, seed)
    else:
        pipe = tf.data.Dataset.from_tensor_slices((files, labels))
        if shuffle:
            pipe = pipe.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
        pipe = pipe.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return pipe.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def rows_pipeline(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0):
    """tf.data of (x rows, label) batches, each batch read from `x` (in memory or memory-mapped) by
    row number; shuffled over the whole split (row numbers are small), anew every epoch. Slicing `x`
    itself into tf.data would copy all of it into the graph."""
    import tensorflow as tf

    rows = tf.data.Dataset.range(len(y))
    if shuffle:
        rows = rows.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    x_dtype, y_dtype = tf.as_dtype(x.dtype), tf.as_dtype(y.dtype)

    def read(at):
        return np.asarray(x[at]), y[at]

    def fetch(at):
        values, labels = tf.numpy_function(read, [at], (x_dtype, y_dtype))
        return tf.ensure_shape(values, (None, *x.shape[1:])), tf.ensure_shape(labels, (None,))

    return rows.batch(batch_size).map(fetch).prefetch(2)


def decoded_split(ds: Dataset, indices: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The split's images, decoded once by tf.data into the file every process shares (harness/data.py)."""
    import tensorflow as tf

    size = (ds.image_size, ds.image_size)

    def decode(files: np.ndarray, out: np.ndarray) -> None:
        pipe = (
            tf.data.Dataset.from_tensor_slices(files)
            .map(lambda f: decode_image(tf.io.read_file(f), size), num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size)
        )
        at = 0
        for batch in pipe:
            out[at : at + len(batch)] = batch.numpy()
            at += len(batch)

    return data.decoded_split(ds, indices, decode)


def undecodable_images(paths: list[str], image_size: int = 32) -> list[str]:
    """The files among `paths` that `decode_image` fails on, decoded in parallel by tf.data: a file
    that fails drops out of the pipeline (ignore_errors), and the ones missing at the end are bad."""
    if not paths:
        return []
    import tensorflow as tf

    def decodes(path):
        image = decode_image(tf.io.read_file(path), (image_size, image_size))
        # A value of the pixels, not the (static) shape: tf.data's optimizer would prune a decode nothing reads.
        return path, tf.reduce_max(image)

    pipe = (
        tf.data.Dataset.from_tensor_slices(np.asarray(paths))
        .map(decodes, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        .ignore_errors()
    )
    read = {path.decode() for path, _ in pipe.as_numpy_iterator()}
    return [p for p in paths if p not in read]
