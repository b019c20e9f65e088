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


def decoded(path, size=SIZE):
    """The pixels the model should see: the same ops as harness.data.tf_dataset."""
    import tensorflow as tf

    img = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
    return tf.cast(tf.clip_by_value(tf.image.resize(img, (size, size)), 0, 255), tf.uint8).numpy()


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
                model,
                name="model",
                signature=infer_signature(x, model.predict(x, verbose=0)),
                metadata={"class_names": CLASSES, "image_size": SIZE},
                registered_model_name="tiny",
            )
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
    from harness.frameworks.keras.framework import KerasPredictor

    _, model = keras_file
    df, skipped = predict_folder(KerasPredictor(model), CLASSES, images, batch_size=2)
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


# --- limits on input and output --------------------------------------------------------------


def png_header(path, width, height):
    """A PNG that declares width x height pixels but holds one byte of image data: a decompression
    bomb's header, cheap to write. Decoding it would allocate the whole image first."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def test_images_over_the_pixel_limit_are_named_and_skipped_before_decoding(keras_file, images, tmp_path, capsys):
    path, model = keras_file
    folder = tmp_path / "big"
    folder.mkdir()
    for name in ("a.png", "b.png"):  # 24x20 = 480 and 16x16 = 256 pixels
        (folder / name).write_bytes((images / name).read_bytes())
    png_header(folder / "huge.png", 10_000, 10_000)  # 100 M pixels: over the default, Pillow only warns
    png_header(folder / "bomb.png", 20_000, 20_000)  # 400 M pixels: Pillow itself refuses the header
    out = tmp_path / "out.csv"
    assert main([str(path), str(folder), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "huge.png: 10000x10000 image, 100,000,000 pixels, is over the limit of 89,478,485" in err
    assert "bomb.png" in err and "400000000 pixels" in err
    assert pd.read_csv(out)["file"].tolist() == ["a.png", "b.png"]

    assert main([str(path), str(folder), "--out", str(out), "--max-pixels", "300"]) == 0
    assert "a.png: 24x20 image, 480 pixels, is over the limit of 300 (--max-pixels)" in capsys.readouterr().err
    df = pd.read_csv(out)
    assert df["file"].tolist() == ["b.png"]
    np.testing.assert_allclose(
        df[[f"p_{c}" for c in CLASSES]], model.predict(decoded(folder / "b.png")[None], verbose=0), atol=1e-5
    )
    from harness.frameworks.keras.framework import KerasPredictor

    df, skipped = predict_folder(KerasPredictor(model), CLASSES, folder, max_pixels=256)
    assert df["file"].tolist() == ["b.png"] and [f for f, _ in skipped] == ["a.png", "bomb.png", "huge.png"]


@pytest.mark.parametrize("where", ["folder", "slash", "under_a_file"])
def test_out_that_is_no_file_path_is_refused_before_any_work(images, tmp_path, capsys, where):
    (tmp_path / "taken").mkdir()
    (tmp_path / "notes.txt").write_text("a file")
    out = {
        "folder": str(tmp_path / "taken"),
        "slash": str(tmp_path / "new") + "/",
        "under_a_file": str(tmp_path / "notes.txt" / "out.csv"),
    }[where]
    # A model that does not exist: the --out check comes first, before the model is looked for.
    assert main([str(tmp_path / "missing.keras"), str(images), "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out!r}: ") and len(err.strip().splitlines()) == 1
    assert ("is a folder" in err) if where != "under_a_file" else ("notes.txt' is a file, not a folder" in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "taken"]
    assert list((tmp_path / "taken").iterdir()) == []


# --- the winner, registered as the harness registers it, used without the harness ----------

# Run in a Python where the harness cannot be imported (it is installed in this environment, so
# a finder placed first refuses it): the registered winner must load and predict from MLflow and
# Keras alone, as in a serving image or a colleague's notebook.
WITHOUT_HARNESS = r"""
import sys

class RefuseHarness:
    def find_spec(self, name, path=None, target=None):
        if name == "harness" or name.startswith("harness."):
            raise ImportError(f"{name} is not installed here")

sys.meta_path.insert(0, RefuseHarness())
import json
import keras
import mlflow
import mlflow.keras
import mlflow.pyfunc
import numpy as np

uri, folder = sys.argv[1], sys.argv[2]
mlflow.set_tracking_uri(uri)
pixels = np.load(f"{folder}/pixels.npy")
assert pixels.dtype == np.uint8
np.save(f"{folder}/keras.npy", mlflow.keras.load_model("models:/demo@champion").predict(pixels, verbose=0))
np.save(f"{folder}/pyfunc.npy", np.asarray(mlflow.pyfunc.load_model("models:/demo/1").predict(pixels)))
for mode in ("caffe", "torch"):
    model = keras.saving.load_model(f"{folder}/{mode}.keras", safe_mode=True)
    np.save(f"{folder}/{mode}.npy", np.asarray(model(pixels.astype("float32"))))
try:
    keras.saving.load_model(f"{folder}/former.keras", safe_mode=True)
    former = "loaded"
except Exception as exc:
    former = f"{type(exc).__name__}: {exc}"
try:
    import harness
    blocked = False
except ImportError:
    blocked = True
print(json.dumps({"former": former, "harness_blocked": blocked}))
"""


def test_the_registered_winner_loads_and_predicts_where_the_harness_is_not_installed(images, tmp_path, capsys):
    import subprocess
    import sys
    from types import SimpleNamespace

    import keras
    import mlflow
    import optuna
    from mlflow.tracking import MlflowClient

    from harness.frameworks.keras.model import BackbonePreprocess, ModelSpec, build_model, preprocessing
    from harness.tracking import Tracker, global_tracking_uri
    from harness.winner import CHAMPION_ALIAS, deliver_winner

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "demo", str(tmp_path / "artifacts"))
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    keras.utils.set_random_seed(0)
    tm = build_model(ModelSpec("MobileNetV2", 32, 3, None, {"alpha": 0.35}, head_units=8, augment=True))
    tracker.log_keras_model(run_id, tm.model, CLASSES, 32)
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"mlflow_run_id": run_id}))
    cfg = SimpleNamespace(study=SimpleNamespace(name="demo", metric="val_accuracy"))
    logged = []
    winner = deliver_winner(cfg, study, tracker, lambda task: {"test_accuracy": 0.5, "val_accuracy": 0.5}, logged.append)
    assert str(winner["version"]) == "1" and winner["model_uri"] == "models:/demo/1"
    assert str(MlflowClient(uri).get_model_version_by_alias("demo", CHAMPION_ALIAS).version) == "1"
    assert any("alias 'champion'" in line for line in logged)
    with global_tracking_uri(uri):
        signature = mlflow.models.get_model_info("models:/demo@champion").signature
    [spec] = signature.inputs.inputs
    assert spec.type == np.dtype("uint8") and tuple(spec.shape) == (-1, 32, 32, 3)

    # harness.predict with the alias: the same probabilities as the model in memory.
    out = tmp_path / "out.csv"
    assert main(["demo@champion", str(images), "--out", str(out), "--tracking-uri", uri]) == 0
    assert "models:/demo@champion" in capsys.readouterr().out
    pixels = np.stack([decoded(images / f, 32) for f in GOOD])
    in_harness = tm.model.predict(pixels, verbose=0)
    df = pd.read_csv(out)
    assert df["file"].tolist() == GOOD
    np.testing.assert_allclose(df[[f"p_{c}" for c in CLASSES]], in_harness, atol=1e-5)

    # The same in a Python without the harness, with the preprocessing of the other families too;
    # a model holding the former harness layer is the control: it must fail to load there.
    np.save(tmp_path / "pixels.npy", pixels)
    for mode, backbone in (("caffe", "ResNet50"), ("torch", "DenseNet121")):
        preprocessing(backbone).save(tmp_path / f"{mode}.keras")
    inputs = keras.Input((32, 32, 3))
    keras.Model(inputs, BackbonePreprocess("ResNet50")(inputs)).save(tmp_path / "former.keras")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLFLOW_"))}
    child = subprocess.run(
        [sys.executable, "-I", "-c", WITHOUT_HARNESS, uri, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["harness_blocked"] is True
    assert "BackbonePreprocess" in report["former"], report["former"]
    for flavour in ("keras", "pyfunc"):
        probabilities = np.load(tmp_path / f"{flavour}.npy")
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(probabilities, in_harness, atol=1e-5)
    np.testing.assert_array_equal(
        np.load(tmp_path / "caffe.npy"), keras.applications.resnet.preprocess_input(pixels.astype("float32"))
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "torch.npy"), keras.applications.densenet.preprocess_input(pixels.astype("float32")), atol=1e-6
    )
