"""`python -m harness.predict`: a tiny model from a .keras file and from an MLflow store, on a few PNGs."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from harness.predict import main, predict_folder

CLASSES = ["circle", "square", "star"]
SIZE = 16


def tiny_model():
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax")(x)
    return keras.Model(inputs, outputs)


def decoded(path):
    """The pixels the model should see: the same ops as harness.data.tf_dataset."""
    import tensorflow as tf

    img = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
    return tf.cast(tf.clip_by_value(tf.image.resize(img, (SIZE, SIZE)), 0, 255), tf.uint8).numpy()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """4 readable images (odd sizes, grayscale, one in a sub-folder), one corrupt .png, one .txt."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "b.png")
    Image.fromarray(rng.integers(0, 256, (30, 10), dtype=np.uint8), mode="L").save(folder / "gray.png")
    (folder / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / "sub" / "c.png")
    (folder / "broken.png").write_bytes(rng.integers(0, 256, 200, dtype=np.uint8).tobytes())
    (folder / "notes.txt").write_text("not an image")
    return folder


GOOD = ["a.png", "b.png", "gray.png", "sub/c.png"]


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    model = tiny_model()
    model.save(folder / "tiny.keras")
    (folder / "classes.json").write_text(json.dumps(CLASSES))
    return folder / "tiny.keras", model


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite MLflow store holding one run with the tiny model, registered as `tiny`."""
    import mlflow
    import mlflow.keras
    from mlflow.models import infer_signature

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    model = tiny_model()
    x = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.create_experiment("predict", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp) as run:
            info = mlflow.keras.log_model(
                model, name="model", signature=infer_signature(x, model.predict(x, verbose=0)),
                metadata={"class_names": CLASSES, "image_size": SIZE}, registered_model_name="tiny")
    finally:
        mlflow.set_tracking_uri(None)  # it also exported $MLFLOW_TRACKING_URI; later tests choose their own
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return uri, run.info.run_id, info, model, root


def expected(model, folder):
    pixels = np.stack([decoded(folder / f) for f in GOOD])
    return model.predict(pixels, verbose=0)


def check_csv(out, model, folder, classes=CLASSES):
    df = pd.read_csv(out)
    assert list(df.columns) == ["file", "predicted_class", "confidence"] + [f"p_{c}" for c in classes]
    assert df["file"].tolist() == GOOD
    p = df[[f"p_{c}" for c in classes]].to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(p, expected(model, folder), atol=1e-5)
    assert set(df["predicted_class"]) <= set(classes)
    assert df["predicted_class"].tolist() == [classes[i] for i in p.argmax(axis=1)]
    np.testing.assert_allclose(df["confidence"], p.max(axis=1), atol=1e-6)
    return df


def test_keras_file(keras_file, images, tmp_path, capsys):
    path, model = keras_file
    out = tmp_path / "preds" / "out.csv"
    assert main([str(path), str(images), "--out", str(out), "--batch-size", "3"]) == 0
    check_csv(out, model, images)
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.png" in captured.err
    assert "notes.txt" not in captured.err
    assert "predicted 4 images, skipped 1" in captured.out
    assert [p.name for p in out.parent.iterdir()] == ["out.csv"]  # no temp file left behind


def test_predict_folder_direct(keras_file, images):
    _, model = keras_file
    df, skipped = predict_folder(model, CLASSES, images, batch_size=2)
    assert df["file"].tolist() == GOOD
    assert [f for f, _ in skipped] == ["broken.png"]
    np.testing.assert_allclose(df[[f"p_{c}" for c in CLASSES]], expected(model, images), atol=1e-5)


def test_keras_file_without_class_names(keras_file, images, tmp_path, capsys):
    path, model = keras_file
    bare = tmp_path / "bare.keras"
    bare.write_bytes(path.read_bytes())
    out = tmp_path / "out.csv"
    assert main([str(bare), str(images), "--out", str(out)]) == 0
    check_csv(out, model, images, classes=["class_0", "class_1", "class_2"])
    assert "class_0..class_2" in capsys.readouterr().err


def test_registered_name(store, images, tmp_path):
    uri, _, _, model, _ = store
    out = tmp_path / "out.csv"
    assert main(["tiny", str(images), "--out", str(out), "--tracking-uri", uri]) == 0
    check_csv(out, model, images)  # p_circle...: the names came from the logged metadata
    assert main(["tiny/1", str(images), "--out", str(out), "--tracking-uri", uri]) == 0
    check_csv(out, model, images)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # predict put MLflow's global state back


def test_run_id(store, images, tmp_path):
    uri, run_id, _, model, _ = store
    out = tmp_path / "out.csv"
    assert main([run_id, str(images), "--out", str(out), "--tracking-uri", uri]) == 0
    check_csv(out, model, images)


def test_logged_keras_file_reads_mlmodel(store, images, tmp_path):
    """A bare path into MLflow's artifact layout still finds the class names in the MLmodel."""
    _, _, info, model, root = store
    [path] = (root / "artifacts").glob(f"**/{info.model_id}/**/model.keras")
    out = tmp_path / "out.csv"
    assert main([str(path), str(images), "--out", str(out)]) == 0
    check_csv(out, model, images)


def test_unknown_registered_name(store, images, tmp_path, capsys):
    uri = store[0]
    out = tmp_path / "out.csv"
    assert main(["nope", str(images), "--out", str(out), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "not found" in err and "models:/nope/latest" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_and_empty_folder(keras_file, tmp_path, capsys):
    path, _ = keras_file
    out = tmp_path / "out.csv"
    assert main([str(path), str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(path), str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "no images" in capsys.readouterr().err
    assert not out.exists()


def test_no_readable_image(keras_file, tmp_path, capsys):
    path, _ = keras_file
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out.csv"
    assert main([str(path), str(tmp_path / "bad"), "--out", str(out)]) == 1
    assert "x.jpg" in capsys.readouterr().err
    assert not out.exists()
