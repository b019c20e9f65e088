"""Benchmark: does resident memory stay flat when Keras models are built and fit in one process?

Builds a small MobileNetV2 (alpha 0.35, 32 px, random init), fits it for 2 epochs on 240 random
images, then deletes it and clears the Keras session, collects garbage and malloc_trims, ten
times over, printing the process's resident memory after each round. No harness code is
involved: this is the plain Keras loop a sweep would run, and the reason the harness runs trials
in child processes (harness/worker.py). Usage:

    python benchmarks/keras_fit_leak.py [--rounds 10] [--no-fit]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-fit", action="store_true", help="only build and compile (shows building alone does not leak)")
    args = parser.parse_args()

    import keras
    import numpy as np
    import psutil
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (240, 32, 32, 3)).astype("uint8")
    y = rng.integers(0, 6, 240)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    rss = []
    for i in range(args.rounds):
        base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None)
        inputs = keras.Input((32, 32, 3))
        features = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
        model = keras.Model(inputs, keras.layers.Dense(6, activation="softmax")(features))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        if not args.no_fit:
            model.fit(data, epochs=2, validation_data=data, verbose=0)
        del model, base
        keras.backend.clear_session()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        rss.append(psutil.Process().memory_info().rss / 2**20)
        print(f"round {i + 1}: RSS {rss[-1]:.0f} MiB", flush=True)
    per_round = (rss[-1] - rss[0]) / max(1, len(rss) - 1)
    print(
        f"{'build only' if args.no_fit else 'build + fit'}: {per_round:+.0f} MiB per round after the first "
        f"({rss[0]:.0f} -> {rss[-1]:.0f} MiB over {len(rss)} rounds)"
    )


if __name__ == "__main__":
    main()
