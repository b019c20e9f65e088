"""The Keras implementation of the framework seam (harness/frameworks/base.py)."""

from __future__ import annotations

import numpy as np

from harness.frameworks.base import ModelSpec, PhaseData, PhaseRun
from harness.frameworks.keras import data, device, features, loop
from harness.frameworks.keras.model import TransferModel, build_model, set_trainable
from harness.phases import Phase


def _keras_model(model):
    """The keras.Model of a built TransferModel or of a model loaded back from the store."""
    return model.model if isinstance(model, (TransferModel, KerasPredictor)) else model


class KerasPredictor:
    """A loaded Keras model as a Predictor: uint8 images in, probabilities out, quietly."""

    def __init__(self, model):
        self.model = model
        self.input_shape, self.output_shape = model.input_shape, model.output_shape

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.model.predict_on_batch(images)

    def decode(self, raw: bytes, size: tuple[int, int]) -> np.ndarray:
        return data.decode_image(raw, size).numpy()


class KerasFramework:
    name = "keras"
    decoder_formats = data.DECODER_FORMATS

    def prepare_process(self, train) -> None:
        device.import_quietly()
        device.apply_device_switches(train)

    def seed(self, seed: int) -> None:
        device.seed_everything(seed)

    def make_reproducible(self, seed: int) -> None:
        import keras
        import tensorflow as tf

        keras.backend.clear_session()
        keras.utils.set_random_seed(seed)
        tf.config.experimental.enable_op_determinism()

    def release_memory(self) -> None:
        device.release_memory()

    def trial_level_errors(self) -> tuple[type[BaseException], ...]:
        return device.trial_level_errors()

    def out_of_memory(self, message: str) -> BaseException:
        return device.out_of_memory(message)

    def build(self, spec: ModelSpec, seed: int) -> TransferModel:
        return build_model(spec, seed=seed)

    def set_trainable(self, model: TransferModel, unfreeze_blocks: int) -> tuple[int, int]:
        return set_trainable(model, unfreeze_blocks)

    def weights_keeper(self, model: TransferModel) -> loop.KerasWeightsKeeper:
        return loop.KerasWeightsKeeper(model.model)

    def backbone_size(self, model: TransferModel) -> int:
        return int(model.backbone.count_params())

    def weights_of(self, model: TransferModel) -> list:
        return model.model.get_weights()

    def load_weights(self, model: TransferModel, weights: list) -> None:
        model.model.set_weights(weights)

    def sweep_process_gpus(self) -> list[tuple[str, tuple[int, int] | None]]:
        found = device.hide_gpus_from_this_process()
        return list(zip(device.visible_gpus(found), device.gpu_capabilities(found)))

    def backbone_blocks(self, name: str, image_size: int, weights: str | None, options: dict) -> int:
        from harness.frameworks.keras.backbones import count_blocks

        return count_blocks(name, image_size, weights, options)

    def start_trial_process(self, threads: int, gpu_memory_limit_mib: float | None) -> dict:
        device.import_quietly()
        if threads:
            device.set_threads(threads)
        return device.initialize_devices(gpu_memory_limit_mib)

    def image_batches(self, dataset, indices: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0):
        return data.tf_dataset(dataset, indices, batch_size, shuffle=shuffle, seed=seed)

    def array_batches(self, x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0):
        if x.dtype != np.float32:
            x = np.asarray(x, np.float32)
        return data.rows_pipeline(x, y, batch_size, shuffle, seed)

    def run_phase(self, model: TransferModel, phase: Phase, data: PhaseData, run: PhaseRun) -> int:
        return loop.run_phase(model, phase, data, run)

    def short_runs(self, model: TransferModel, train, rates: list[float], steps: int) -> dict[float, float]:
        return loop.short_runs(model, train, rates, steps)

    def evaluate(self, model, batches) -> dict[str, float]:
        return loop.evaluate(_keras_model(model), batches)

    def predict(self, model, batches) -> np.ndarray:
        return _keras_model(model).predict(batches, verbose=0)

    def weights_digest(self, model: TransferModel) -> str:
        return features.weights_digest(model)

    def boundary_layer(self, model: TransferModel, unfrozen_blocks: int) -> str:
        return features.boundary_layer(model, unfrozen_blocks)

    def activation_shape(self, model: TransferModel, layer: str) -> tuple[int, ...]:
        return features.activation_shape(model, layer)

    def write_activations(self, model: TransferModel, layer: str, batches, out: np.ndarray) -> None:
        features.write_activations(model, layer, batches, out)

    def model_above(self, model: TransferModel, layer: str):
        return features.model_above(model, layer)

    def log_model(self, tracker, run_id: str, model: TransferModel, class_names: list[str], tags: dict) -> None:
        tracker.log_keras_model(run_id, model.model, class_names, model.spec.image_size, tags=tags)

    def load_model(self, model_uri: str, tracking_uri: str | None = None) -> KerasPredictor:
        """A logged model, or a `.keras` file (loaded in safe mode: no code in it runs)."""
        import keras

        from harness.frameworks.keras import model as _registers_layers  # noqa: F401 - layers older models hold
        from harness.tracking import load_keras_model

        if model_uri.endswith(".keras"):
            return KerasPredictor(keras.saving.load_model(model_uri, safe_mode=True))
        return KerasPredictor(load_keras_model(model_uri, tracking_uri))

    def save_backbone_weights(self, model: TransferModel, path: str) -> None:
        model.backbone.save_weights(path)

    def undecodable(self, paths: list[str], image_size: int) -> list[str]:
        return data.undecodable_images(paths, image_size)

    def decoder_name(self) -> str:
        import tensorflow as tf

        return f"tensorflow {tf.__version__} {data.DECODER_FORMATS}"


FRAMEWORK = KerasFramework()
