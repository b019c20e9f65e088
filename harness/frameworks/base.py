"""The framework seam: what the one training path (harness/training.py) needs from a framework.

Everything above this seam (training, tasks, the engine, quadrants, screening, verdicts, the
report and the command line) is framework-free: it holds `Model` handles and `Batches` it never
looks inside, and asks a `Framework` to act on them. Keras is one implementation
(harness/frameworks/keras/), PyTorch another (harness/frameworks/torch/). A trial process
imports one of them only (harness/frameworks/__init__.py `framework_for`).

What stays above the seam, framework-free and pure: the plans (harness/phases.py: which phases,
how many epochs, which blocks unfreeze, the stopping rules), which weights count as best
(`direction.better` on the monitored metric), the feature cache's rule and its files
(harness/features.py), the from-scratch recipe and the confirmation rule (harness/scratch.py).

    >>> fw = framework_for("MobileNetV2")              # harness.frameworks
    >>> model = fw.build(spec, seed=0)
    >>> fw.set_trainable(model, unfreeze_blocks=0)     # phase 1: the head alone
    >>> ran = fw.run_phase(model, phase, PhaseData(train, val), run)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from harness.config import TrainConfig
    from harness.data import Dataset
    from harness.phases import EpochRecord, Phase

# Opaque to everything above the seam: a framework's own objects.
Model = Any  # a built model: backbone + head, with its spec (`model.spec`) and block count (`model.n_blocks`)
Batches = Any  # an iterable of (inputs, labels) batches in the framework's own form (tf.data, a DataLoader)


@dataclass(frozen=True)
class ModelSpec:
    """What to build: one backbone, one head, one input size. The same spec means the same model
    in every framework (the framework is chosen by the backbone's name)."""

    backbone: str  # a keras.applications name, or "torchvision/<name>", "timm/<name>"
    image_size: int  # square input, px
    num_classes: int
    weights: str | None  # "imagenet", None (random init) or a weights-file path
    backbone_options: dict  # passed to the backbone's builder (e.g. alpha, width_mult)
    head_units: int = 0  # 0: no hidden layer in the head
    dropout: float = 0.0
    pooling: str = "avg"  # "avg" | "max"
    augment: bool = False  # random flip, rotation and zoom inside the model (training only)
    cut_fraction: float = 1.0  # keep this share of the backbone's blocks (intermediate features)

    @property
    def pretrained(self) -> bool:
        return self.weights is not None


@dataclass
class PhaseData:
    """What one phase trains and validates on.

    `fitted` is None when the whole model trains on images. With cached activations it is the
    part of the model above them (`Framework.model_above`): the head on pooled features, or the
    backbone's top blocks and the head on the activations at the freeze boundary. It shares its
    weights with the whole model, so training it trains the model."""

    train: Batches
    val: Batches | None
    fitted: Any = None


@dataclass
class PhaseRun:
    """How one phase runs on the plan's shared epoch axis."""

    start_epoch: int  # the phase's first epoch on the shared timeline
    on_epoch: Callable[[EpochRecord], None]  # after every epoch; may raise (pruned, stop requested)
    monitor: str = "val_accuracy"
    direction: str = "maximize"
    class_weight: dict[int, float] | None = None  # label -> loss weight; validation stays unweighted


class WeightsKeeper(Protocol):
    """The best epoch's weights across every phase of a plan. The caller decides *when* an epoch is
    the best (`keep` after an improving epoch); the framework decides *what* to copy (the
    variables that can change in the current phase, BatchNormalization's moving statistics
    included, so a from-scratch model keeps the statistics its score was measured with)."""

    def start_phase(self) -> None:
        """Call after a phase's trainability is set, before it trains."""

    def keep(self) -> None:
        """The current weights are the best so far."""

    def restore(self) -> None:
        """Put the best weights back (nothing when none was kept)."""


class Predictor(Protocol):
    """A model loaded back from the MLflow store (or a file): uint8 images (N, H, W, 3) -> class
    probabilities, with its input shape (None where unsized), its output shape and the decoder
    training read its images with."""

    input_shape: tuple  # (batch, height, width, 3), None where unsized
    output_shape: tuple  # (batch, classes)

    def predict(self, images: np.ndarray) -> np.ndarray: ...

    def decode(self, raw: bytes, size: tuple[int, int]) -> np.ndarray:
        """An image file's bytes -> uint8 (height, width, 3) at `size`, as training decoded it."""


class Framework(Protocol):
    name: str  # "keras" | "torch": the run param `framework`
    decoder_formats: str  # what the training decoder reads, in words ("tf.io.decode_image: JPEG, PNG, ...")

    # --- this process ----------------------------------------------------------------------
    def prepare_process(self, train: TrainConfig) -> None:
        """Once per trial process, before it builds a model: a quiet import, the device switches
        (train.mixed_precision, train.jit_compile), thread counts."""

    def seed(self, seed: int) -> None:
        """Seed every generator a task draws from (Python, NumPy and the framework's own)."""

    def make_reproducible(self, seed: int) -> None:
        """A clean state, every generator seeded and deterministic ops: for a run that must
        reproduce bit for bit (the shipped source backbone)."""

    def release_memory(self) -> None:
        """Drop what the last task left (graphs, caches, GPU memory) before the next one."""

    def trial_level_errors(self) -> tuple[type[BaseException], ...]:
        """Exceptions that end one trial but not the sweep (out of memory, a framework error)."""

    # --- models ------------------------------------------------------------------------------
    def build(self, spec: ModelSpec, seed: int) -> Model:
        """Backbone + head, preprocessing inside, with `model.spec` and `model.n_blocks`."""

    def set_trainable(self, model: Model, unfreeze_blocks: int) -> tuple[int, int]:
        """Freeze the backbone, then unfreeze its top `unfreeze_blocks` whole blocks (-1: every
        layer, BatchNormalization's statistics included: from scratch). The head always trains.
        A pretrained backbone's BatchNormalization stays in inference mode. Returns the
        (trainable, total) parameter counts."""

    def weights_keeper(self, model: Model) -> WeightsKeeper: ...

    def backbone_size(self, model: Model) -> int:
        """The backbone's parameter count (screening's size ranking)."""

    def weights_of(self, model: Model) -> Any:
        """A copy of every weight (and statistic) of `model`, to put into another model built from
        the same spec (`load_weights`): an earlier from-scratch attempt that came closer."""

    def load_weights(self, model: Model, weights: Any) -> None: ...

    def out_of_memory(self, message: str) -> BaseException:
        """The error this framework raises when the device runs out of memory (fault injection)."""

    def sweep_process_gpus(self) -> list[tuple[str, tuple[int, int] | None]]:
        """In the sweep process, which trains nothing: the GPUs the trial processes may use, as
        (CUDA_VISIBLE_DEVICES name, compute capability), kept from this process's own use."""

    def backbone_blocks(self, name: str, image_size: int, weights: str | None, options: dict) -> int:
        """Build the backbone alone with its weights and count its blocks, keeping nothing: fails
        fast, before the night, on a download that cannot happen or a file that does not fit."""

    def start_trial_process(self, threads: int, gpu_memory_limit_mib: float | None) -> dict:
        """First thing in a trial process, after CUDA_VISIBLE_DEVICES is set: the quiet import,
        the thread count (0: the default), the GPU memory rule; returns what the parent is told."""

    # --- data --------------------------------------------------------------------------------
    def image_batches(self, dataset: Dataset, indices: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0) -> Batches:
        """(uint8 image, label) batches of one split: every framework sees the same images."""

    def array_batches(self, x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0) -> Batches:
        """(row, label) batches of cached activations (in memory or memory-mapped)."""

    # --- training ----------------------------------------------------------------------------
    def run_phase(self, model: Model, phase: Phase, data: PhaseData, run: PhaseRun) -> int:
        """Train one phase of a plan (trainability already set, a fresh optimizer at
        `phase.learning_rate` over the trainable weights only); returns the epochs it ran. Each
        epoch ends with `run.on_epoch(record)` on the shared timeline (the caller keeps the best
        weights there, and may raise to stop: pruned, stop requested); a NaN or infinite loss
        raises phases.NonFiniteLoss; a stop request (runtime.check_stop) is honoured within a
        batch. Early stopping follows `phase.patience` (`phases.uses_stall_stopping`: the
        from-scratch rule); a phase whose BatchNormalization trains re-estimates its statistics
        before each validation."""

    def short_runs(self, model: Model, train: Batches, rates: list[float], steps: int) -> dict[float, float]:
        """Train `model` (trainability set) two epochs of `steps` batches at each rate in turn,
        each from the weights it has now and a fresh optimizer state; returns each rate's last
        epoch's training loss (NaN or inf where it diverged). The model ends as it started."""

    def evaluate(self, model: Model, batches: Batches) -> dict[str, float]:
        """Inference-mode {"loss", "accuracy"} over a split."""

    def predict(self, model: Model, batches: Batches) -> np.ndarray:
        """Inference-mode class probabilities, in the split's order."""

    # --- frozen features (the cache, screening) ----------------------------------------------
    def weights_digest(self, model: Model) -> str:
        """A hash of the backbone's weight values: the content its features depend on."""

    def boundary_layer(self, model: Model, unfrozen_blocks: int) -> str | None:
        """The name of the activations that feed the first unfrozen block ("pool": the pooled
        features); None when the model cannot be entered there (a backbone that is not a chain of
        blocks, such as a timm or ViT model: that phase trains on images)."""

    def activation_shape(self, model: Model, layer: str) -> tuple[int, ...]:
        """One image's activations at `layer` ("pool" or a boundary_layer)."""

    def write_activations(self, model: Model, layer: str, batches: Batches, out: np.ndarray) -> None:
        """The frozen model's float32 activations at `layer`, batch by batch, into `out`."""

    def model_above(self, model: Model, layer: str) -> Any:
        """The part of `model` above `layer`, trained on cached activations (PhaseData.fitted)."""

    # --- model files -------------------------------------------------------------------------
    def log_model(self, tracker: Any, run_id: str, model: Model, class_names: list[str], tags: dict) -> None:
        """Log the model to the run with MLflow's flavour for this framework (harness/tracking.py)."""

    def load_model(self, model_uri: str, tracking_uri: str | None = None) -> Predictor:
        """A logged model (`models:/`, `runs:/`), or a model file of this framework's own format."""

    def save_backbone_weights(self, model: Model, path: str) -> None:
        """The backbone's weights alone, as `ModelSpec.weights` loads them (a source backbone)."""

    # --- preflight ---------------------------------------------------------------------------
    def undecodable(self, paths: list[str], image_size: int) -> list[str]:
        """The image files this framework's decoder cannot read (the decoder training uses)."""

    def decoder_name(self) -> str:
        """The training decoder and its version: a file it read is trusted only by the same one."""
