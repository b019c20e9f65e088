"""Backbone + head, and freezing by depth.

The model is `input -> [augmentation] -> backbone's preprocess_input -> backbone -> pooling ->
[dropout -> Dense(head_units, relu)] -> dropout -> Dense(classes, softmax)`.

A pretrained backbone is called with `training=False`, so its BatchNormalization layers run in
inference mode in both phases, even once unfrozen (the Keras transfer-learning guide: otherwise
the batch statistics of a small target set overwrite the pretrained ones). A randomly initialised
backbone is called in the default mode, so its BatchNormalization trains; its momentum is lowered
because Keras' default of 0.99-0.999 leaves the moving statistics near their initial 0/1 after a
few hundred steps, and inference-mode accuracy would then sit at chance.

Freeze policy is a set of small pure functions over block lists (see `blocks_to_unfreeze`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras

from harness.frameworks.base import ModelSpec
from harness.frameworks.keras import backbones as bb
from harness.phases import blocks_to_keep

RANDOM_INIT_BN_MOMENTUM = 0.9  # fits moving statistics within ~50 steps


def preprocessing(backbone: str) -> keras.Model:
    """The backbone's `preprocess_input` as a small model of Keras' own parts, named "preprocess".

    Built-in parts only (a channel flip op and `Rescaling`, see `backbones.pixel_transform`), so a
    saved model loads in safe mode where the harness is not installed: a serving image, `mlflow
    models serve`, a colleague's notebook. No weights: a model's weight list is the same as with
    the layer it replaces. The arithmetic runs in float32 under the mixed_float16 policy too, as
    `preprocess_input` does; the backbone casts its result.
    """
    t = bb.pixel_transform(backbone)
    pixels = keras.Input((None, None, 3), name="pixels")
    x = keras.ops.flip(pixels, axis=-1) if t.flip_channels else pixels
    x = keras.layers.Rescaling(list(t.scale), offset=list(t.offset), dtype="float32", name="scale")(x)
    return keras.Model(pixels, x, name="preprocess")


@keras.saving.register_keras_serializable(package="harness")
class BackbonePreprocess(keras.layers.Layer):
    """Runs `keras.applications.<module>.preprocess_input` inside the model.

    Models are no longer built with it (see `preprocessing`); it stays registered so that models
    saved before still load where the harness is installed."""

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self._fn = bb.preprocess_fn(backbone)

    def call(self, x):
        return self._fn(keras.ops.cast(x, "float32"))

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}


@dataclass
class TransferModel:
    model: keras.Model
    backbone: keras.Model
    blocks: list[list[str]]  # backbone layer names grouped into blocks, input to output
    spec: ModelSpec

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)


def augmentation_layers(seed: int = 0) -> keras.Sequential:
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.1, seed=seed),
            keras.layers.RandomZoom(0.1, seed=seed),
        ],
        name="augment",
    )


# The head's layers after pooling, input to output (those the spec leaves out are absent):
# harness.features rebuilds the head from them to train it on cached features.
HEAD_LAYERS = ("head_dropout", "head_dense", "dropout", "classifier")


def build_model(spec: ModelSpec, seed: int = 0) -> TransferModel:
    backbone = bb.construct(spec.backbone, spec.image_size, spec.weights, spec.backbone_options)
    blocks = bb.backbone_blocks(backbone, spec.backbone)
    if spec.cut_fraction < 1.0:
        keep = blocks_to_keep(len(blocks), spec.cut_fraction)
        last = blocks[keep - 1][-1]
        backbone = keras.Model(backbone.input, bb.output_of(backbone, last), name=f"{backbone.name}_cut{keep}")
        blocks = blocks[:keep]
    if not spec.pretrained:
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = RANDOM_INIT_BN_MOMENTUM

    inputs = keras.Input((spec.image_size, spec.image_size, 3), name="image")
    x = augmentation_layers(seed)(inputs) if spec.augment else inputs
    x = preprocessing(spec.backbone)(x)
    x = backbone(x, training=False) if spec.pretrained else backbone(x)
    pool = keras.layers.GlobalAveragePooling2D if spec.pooling == "avg" else keras.layers.GlobalMaxPooling2D
    x = pool(name="pool")(x)
    if spec.head_units > 0:
        x = keras.layers.Dropout(spec.dropout, name="head_dropout")(x)
        x = keras.layers.Dense(spec.head_units, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(spec.dropout, name="dropout")(x)
    # float32 under the mixed_float16 policy too (train.mixed_precision): a float16 softmax and its
    # loss lose small probabilities to underflow.
    outputs = keras.layers.Dense(spec.num_classes, activation="softmax", name="classifier", dtype="float32")(x)
    model = keras.Model(inputs, outputs, name=f"{spec.backbone}_transfer")
    return TransferModel(model, backbone, blocks, spec)


# --- freezing by blocks (the policy of how many: harness/phases.py blocks_to_unfreeze) ----------


def trainable_layer_names(blocks: list[list[str]], n_unfrozen: int) -> set[str]:
    """Names of the backbone layers trainable when the top `n_unfrozen` blocks are unfrozen."""
    if n_unfrozen <= 0:
        return set()
    return {name for block in blocks[len(blocks) - n_unfrozen :] for name in block}


def set_backbone_trainable(tm: TransferModel, n_unfrozen: int) -> None:
    """Freeze the whole backbone, then unfreeze its top `n_unfrozen` blocks.

    BatchNormalization layers of a pretrained backbone stay frozen even inside unfrozen blocks
    (their statistics and affine terms are kept as pretrained: the Keras EfficientNet fine-tuning
    example). The model must be recompiled afterwards: compile() captures the trainable state.
    Every block has a non-BN weight to train (`backbones.merge_weightless` merges those that do
    not), so each unfrozen block adds weights; change `backbones._trains_when_unfrozen` with this.
    """
    names = trainable_layer_names(tm.blocks, n_unfrozen)
    tm.backbone.trainable = n_unfrozen > 0
    for layer in tm.backbone.layers:
        train = layer.name in names
        if train and tm.spec.pretrained and isinstance(layer, keras.layers.BatchNormalization):
            train = False
        layer.trainable = train


def set_all_trainable(tm: TransferModel) -> None:
    """From-scratch training: every layer, BatchNormalization included, learns."""
    tm.backbone.trainable = True
    for layer in tm.backbone.layers:
        layer.trainable = True


def set_trainable(tm: TransferModel, unfreeze_blocks: int) -> tuple[int, int]:
    """A phase's trainability (-1: everything, BatchNormalization included); returns the
    (trainable, total) parameter counts the optimizer will see."""
    if unfreeze_blocks < 0:
        set_all_trainable(tm)
    else:
        set_backbone_trainable(tm, unfreeze_blocks)
    return count_params(tm.model)


def all_layers(model):
    """Every layer of `model`, nested models' layers included."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def count_params(model: keras.Model) -> tuple[int, int]:
    """(trainable, total) parameter counts as the optimizer will see them."""
    trainable = sum(int(math.prod(w.shape)) for w in model.trainable_weights)
    total = sum(int(math.prod(w.shape)) for w in model.weights)
    return trainable, total
