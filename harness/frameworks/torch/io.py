"""Model files: the portable model in MLflow's PyTorch flavour, and a backbone's state dict.

The logged model is the trained `nn.Sequential` itself (harness/frameworks/torch/model.py), on the
CPU and in inference mode: uint8 images (N, H, W, 3) in, class probabilities out. MLflow's
PyTorch flavour pickles it whole, and it is made of torch's, torchvision's and timm's classes
alone, so `mlflow.pyfunc.load_model` serves it where only those packages and MLflow are installed.
"""

from __future__ import annotations

import copy
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch

from harness import images
from harness.frameworks.torch import backbones as bb
from harness.frameworks.torch import device as dev
from harness.frameworks.torch.model import TorchModel

PREDICT_BATCH = 64  # images per forward pass when predicting


def requirements(backbone: str) -> list[str]:
    """The pip requirements of a logged model: its packages at the versions that saved it (the
    public release: a local build tag such as +cu130 names no package an index serves)."""
    packages = ["torch", "torchvision"] + (["timm"] if backbone.startswith("timm/") else [])
    pinned = []
    for package in packages:
        try:
            pinned.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pinned.append(package)
    return pinned


def portable(model: TorchModel) -> torch.nn.Sequential:
    """A copy of the model on the CPU, in inference mode, with no gradient state: what is logged."""
    net = copy.deepcopy(model.net).cpu().eval()
    net.requires_grad_(False)
    return net


def log_model(tracker, run_id: str, model: TorchModel, class_names: list[str], tags: dict) -> None:
    tracker.log_pytorch_model(
        run_id, portable(model), class_names, model.spec.image_size, tags, requirements=requirements(model.spec.backbone)
    )


class Predictor:
    """A logged model loaded back: uint8 images (N, H, W, 3) of any size -> class probabilities
    (N, classes), decoding files as training did (harness/images.py)."""

    def __init__(self, net: torch.nn.Module, device: torch.device):
        self.net, self.device = net.to(device).eval(), device
        classes = [m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)]
        self.input_shape = (None, None, None, 3)  # the size it was trained at is in the logged metadata
        self.output_shape = (None, classes[-1] if classes else None)

    def decode(self, raw: bytes, size: tuple[int, int]) -> np.ndarray:
        return images.decode_image(raw, size)

    def predict(self, images: np.ndarray) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for at in range(0, len(images), PREDICT_BATCH):
                batch = torch.from_numpy(np.ascontiguousarray(images[at : at + PREDICT_BATCH], np.uint8))
                out.append(self.net(batch.to(self.device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def load_model(model_uri: str, tracking_uri: str | None = None) -> Predictor:
    """A logged model (`models:/`, `runs:/`) or an MLflow model folder of the PyTorch flavour."""
    from harness.tracking import load_pytorch_model

    device = dev.settings().device
    return Predictor(load_pytorch_model(model_uri, tracking_uri, map_location=str(device)), device)


def save_backbone_weights(model: TorchModel, path: str) -> None:
    """The backbone's weights alone, as `ModelSpec.weights: <path>` loads them (a source backbone)."""
    bb.save_state(model.backbone, path)
