"""The seam's interface (harness/frameworks/base.py `Framework`) for PyTorch, over this package's
modules: one object, `FRAMEWORK`, that the one training path calls."""

from __future__ import annotations

from typing import Any

import numpy as np

# Before anything that may import TensorFlow (harness.phases still imports Keras): torchvision
# imports triton (CUDA builds of torch), which crashes the process once TensorFlow is loaded.
import torchvision  # noqa: F401

from harness.frameworks.base import Framework, ModelSpec, PhaseData, PhaseRun
from harness.frameworks.torch import data, device, features, io, loop
from harness.frameworks.torch.model import TorchModel, build, set_trainable
from harness.images import undecodable
from harness.phases import Phase


class TorchFramework:
    name = "torch"

    # --- this process ----------------------------------------------------------------------
    def prepare_process(self, train, threads: int = 0) -> None:
        """train.mixed_precision and train.jit_compile on this process's GPU; `threads`: its share
        of the CPU cores (0: all), as the engine splits them between trial processes."""
        device.prepare(train, threads)

    def seed(self, seed: int) -> None:
        device.seed(seed)

    def release_memory(self) -> None:
        device.release()

    def trial_level_errors(self) -> tuple[type[BaseException], ...]:
        return device.trial_errors()

    # --- models ------------------------------------------------------------------------------
    def build(self, spec: ModelSpec, seed: int) -> TorchModel:
        return build(spec, seed, device.settings().device)

    def set_trainable(self, model: TorchModel, unfreeze_blocks: int) -> tuple[int, int]:
        return set_trainable(model, unfreeze_blocks)

    def weights_keeper(self, model: TorchModel) -> loop.WeightsKeeper:
        return loop.WeightsKeeper(model)

    # --- data --------------------------------------------------------------------------------
    def image_batches(self, dataset, indices: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0) -> data.Batches:
        return data.image_batches(dataset, indices, batch_size, shuffle, seed)

    def array_batches(self, x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0) -> data.Batches:
        return data.array_batches(x, y, batch_size, shuffle, seed)

    # --- training ----------------------------------------------------------------------------
    def run_phase(self, model: TorchModel, phase: Phase, phase_data: PhaseData, run: PhaseRun) -> int:
        return loop.run_phase(model, phase, phase_data, run)

    def evaluate(self, model: TorchModel, batches) -> dict[str, float]:
        return loop.evaluate_with(model, model.logits, batches)

    def predict(self, model: TorchModel, batches) -> np.ndarray:
        return loop.predict(model, batches)

    # --- frozen features ---------------------------------------------------------------------
    def weights_digest(self, model: TorchModel) -> str:
        return features.weights_digest(model)

    def boundary_layer(self, model: TorchModel, unfrozen_blocks: int) -> str | None:
        return features.boundary_layer(model, unfrozen_blocks)

    def activation_shape(self, model: TorchModel, layer: str) -> tuple[int, ...]:
        return features.activation_shape(model, layer)

    def write_activations(self, model: TorchModel, layer: str, batches, out: np.ndarray) -> None:
        features.write_activations(model, layer, batches, out)

    def model_above(self, model: TorchModel, layer: str) -> features.Above:
        return features.model_above(model, layer)

    # --- model files -------------------------------------------------------------------------
    def log_model(self, tracker: Any, run_id: str, model: TorchModel, class_names: list[str], tags: dict) -> None:
        io.log_model(tracker, run_id, model, class_names, tags)

    def load_model(self, model_uri: str, tracking_uri: str | None = None) -> io.Predictor:
        return io.load_model(model_uri, tracking_uri)

    def save_backbone_weights(self, model: TorchModel, path: str) -> None:
        io.save_backbone_weights(model, path)

    # --- preflight ---------------------------------------------------------------------------
    def undecodable(self, paths: list[str], image_size: int) -> list[str]:
        return undecodable(paths, (image_size, image_size))


FRAMEWORK: Framework = TorchFramework()  # checked against the seam's interface by mypy
