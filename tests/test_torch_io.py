"""Torch model files: MLflow's PyTorch flavour with the harness's signature and metadata, loaded
back by the harness, and by `mlflow.pyfunc` in a Python where the harness cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from harness.frameworks.base import ModelSpec  # noqa: E402
from harness.frameworks.torch import io  # noqa: E402
from harness.frameworks.torch import model as tm  # noqa: E402

CLASSES = ["arc", "pentagon", "star4"]

WITHOUT_HARNESS = r"""
import sys

class RefuseHarness:
    def find_spec(self, name, path=None, target=None):
        if name == "harness" or name.startswith("harness."):
            raise ImportError(f"{name} is not installed here")

sys.meta_path.insert(0, RefuseHarness())
import json
import mlflow
import mlflow.pyfunc
import numpy as np
import torch

uri, folder = sys.argv[1], sys.argv[2]
mlflow.set_tracking_uri(uri)
pixels = np.load(f"{folder}/pixels.npy")
assert pixels.dtype == np.uint8
np.save(f"{folder}/pyfunc.npy", np.asarray(mlflow.pyfunc.load_model(open(f"{folder}/uri.txt").read()).predict(pixels)))
try:
    torch.load(f"{folder}/control.pt", weights_only=False)  # an object of a class the harness defines
    control = "loaded"
except ImportError as exc:
    control = f"{type(exc).__name__}: {exc}"
try:
    import harness
    blocked = False
except ImportError:
    blocked = True
loaded = sorted(m for m in sys.modules if m.startswith("harness"))
print(json.dumps({"control": control, "harness_blocked": blocked, "modules": loaded}))
"""


@pytest.fixture
def logged(tmp_path):
    """A torch model logged to a run of a fresh store: (tracker, model URI, model, images)."""
    from harness.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "torch", str(tmp_path / "artifacts"))
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    model = tm.build(
        ModelSpec("torchvision/mobilenet_v3_small", 32, 3, None, {}, head_units=8, dropout=0.2, augment=True),
        0,
        torch.device("cpu"),
    )
    io.log_model(tracker, run_id, model, CLASSES, {"harness.framework": "torch"})
    pixels = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    return tracker, tracker.run_tags(run_id)["harness.model_uri"], model, pixels


def test_the_logged_model_loads_back_and_predicts_the_same_probabilities(logged):
    import mlflow

    from harness.tracking import global_tracking_uri, logged_model_metadata

    tracker, uri, model, pixels = logged
    with torch.no_grad():
        in_harness = model.net.eval()(torch.from_numpy(pixels)).numpy()
    loaded = io.load_model(uri, tracker.uri)
    np.testing.assert_allclose(loaded.predict(pixels), in_harness, atol=1e-6)
    with global_tracking_uri(tracker.uri):
        assert logged_model_metadata(uri) == {"class_names": CLASSES, "image_size": 32, "framework": "torch"}
        info = mlflow.models.get_model_info(uri)
    assert tracker.logged_model_framework(uri) == "torch"  # how harness.predict picks the framework that loads it
    assert loaded.output_shape == (None, 3) and loaded.input_shape == (None, None, None, 3)
    [spec] = info.signature.inputs.inputs
    assert spec.type == np.dtype("uint8") and tuple(spec.shape) == (-1, 32, 32, 3)
    assert info.tags["harness.framework"] == "torch"
    assert io.requirements("torchvision/resnet18")[0].startswith("torch==") and "+" not in "".join(io.requirements("timm/x"))


def test_the_logged_model_is_built_of_torch_and_torchvision_classes_alone():
    model = tm.build(
        ModelSpec("torchvision/resnet18", 32, 3, None, {}, head_units=8, dropout=0.2, augment=True), 0, torch.device("cpu")
    )
    foreign = {
        type(m).__module__ for m in io.portable(model).modules() if not type(m).__module__.startswith(("torch.", "torchvision."))
    }
    assert foreign == set()


def test_the_logged_model_loads_and_predicts_where_the_harness_cannot_be_imported(logged, tmp_path):
    tracker, uri, model, pixels = logged
    with torch.no_grad():
        in_harness = model.net.eval()(torch.from_numpy(pixels)).numpy()
    np.save(tmp_path / "pixels.npy", pixels)
    (tmp_path / "uri.txt").write_text(uri)
    torch.save(tm.Augmentation(0), tmp_path / "control.pt")  # the control: a harness class, pickled
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLFLOW_"))}
    child = subprocess.run(
        [sys.executable, "-I", "-c", WITHOUT_HARNESS, tracker.uri, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["harness_blocked"] is True and report["modules"] == []
    assert "harness" in report["control"] and report["control"].startswith(("ImportError", "ModuleNotFoundError"))
    probabilities = np.load(tmp_path / "pyfunc.npy")
    np.testing.assert_allclose(probabilities, in_harness, atol=1e-6)


def test_backbone_weights_saved_alone_load_as_the_weights_of_a_new_model(tmp_path):
    spec = ModelSpec("torchvision/mobilenet_v3_small", 32, 3, None, {})
    source = tm.build(spec, 0, torch.device("cpu"))
    path = tmp_path / "source.pt"
    io.save_backbone_weights(source, str(path))
    target = tm.build(ModelSpec("torchvision/mobilenet_v3_small", 32, 5, str(path), {}), 7, torch.device("cpu"))
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(target.backbone.state_dict()[key], value), key
