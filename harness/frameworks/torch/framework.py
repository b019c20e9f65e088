"""The PyTorch implementation of the framework seam (harness/frameworks/base.py), over this
package's modules: one object, `FRAMEWORK`, that the one training path calls."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from harness import images
from harness.frameworks.base import Framework, ModelSpec, PhaseData, PhaseRun
from harness.frameworks.torch import backbones, data, device, features, io, loop
from harness.frameworks.torch.model import TorchModel, build, set_trainable
from harness.phases import Phase

DECODER_FORMATS = "Pillow: JPEG, PNG, GIF, BMP, WebP, TIFF and more"  # what harness/images.py reads


class TorchFramework:
    name = "torch"
    decoder_formats = DECODER_FORMATS

    # --- this process ----------------------------------------------------------------------
    def prepare_process(self, train) -> None:
        device.import_quietly()
        device.prepare(train)

    def seed(self, seed: int) -> None:
        device.seed(seed)

    def make_reproducible(self, seed: int) -> None:
        device.make_reproducible(seed)

    def release_memory(self) -> None:
        device.release()

    def trial_level_errors(self) -> tuple[type[BaseException], ...]:
        return device.trial_errors()

    def out_of_memory(self, message: str) -> BaseException:
        return device.out_of_memory(message)

    def sweep_process_gpus(self) -> list[tuple[str, tuple[int, int] | None]]:
        return device.sweep_process_gpus()

    def start_trial_process(self, threads: int, gpu_memory_limit_mib: float | None) -> dict:
        device.import_quietly()
        return device.start_trial_process(threads, gpu_memory_limit_mib)

    # --- models ------------------------------------------------------------------------------
    def build(self, spec: ModelSpec, seed: int) -> TorchModel:
        return build(spec, seed, device.settings().device)

    def set_trainable(self, model: TorchModel, unfreeze_blocks: int) -> tuple[int, int]:
        return set_trainable(model, unfreeze_blocks)

    def weights_keeper(self, model: TorchModel) -> loop.WeightsKeeper:
        return loop.WeightsKeeper(model)

    def backbone_size(self, model: TorchModel) -> int:
        """Parameters and BatchNorm statistics, as Keras' count_params counts a backbone's weights."""
        return sum(t.numel() for name, t in model.backbone.state_dict().items() if not name.endswith("num_batches_tracked"))

    def weights_of(self, model: TorchModel) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.net.state_dict().items()}

    def load_weights(self, model: TorchModel, weights: dict[str, torch.Tensor]) -> None:
        model.net.load_state_dict(weights)

    def backbone_blocks(self, name: str, image_size: int, weights: str | None, options: dict) -> int:
        return backbones.count_blocks(name, image_size, weights, options)

    # --- data --------------------------------------------------------------------------------
    def image_batches(self, dataset, indices: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0) -> data.Batches:
        return data.image_batches(dataset, indices, batch_size, shuffle, seed)

    def array_batches(self, x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0) -> data.Batches:
        return data.array_batches(x, y, batch_size, shuffle, seed)

    # --- training ----------------------------------------------------------------------------
    def run_phase(self, model: TorchModel, phase: Phase, phase_data: PhaseData, run: PhaseRun) -> int:
        return loop.run_phase(model, phase, phase_data, run)

    def short_runs(self, model: TorchModel, train, rates: list[float], steps: int) -> dict[float, float]:
        return loop.short_runs(model, train, rates, steps)

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
        return images.undecodable(paths, (image_size, image_size))

    def decoder_name(self) -> str:
        import PIL

        return f"pillow {PIL.__version__} {images.DECODER_VERSION} {DECODER_FORMATS}"


FRAMEWORK: Framework = TorchFramework()  # checked against the seam's interface by mypy
