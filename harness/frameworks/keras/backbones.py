"""Registry of `keras.applications` backbones.

The table below is plain data so that config validation can check names and input sizes without
importing TensorFlow. Everything that needs Keras imports it lazily inside the function.

    >>> spec = BACKBONES["MobileNetV2"]
    >>> spec.module, spec.min_size
    ('mobilenet_v2', 32)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneSpec:
    name: str  # the constructor's name in keras.applications, e.g. "ResNet50"
    module: str  # keras.applications.<module> holds its preprocess_input
    min_size: int  # smallest square input (px) the architecture accepts without weights
    # Regex whose first group names the block a layer belongs to; None = use graph cuts only.
    block_pattern: str | None = None


def _spec(names: list[str], module: str, min_size: int, pattern: str | None) -> dict[str, BackboneSpec]:
    return {n: BackboneSpec(n, module, min_size, pattern) for n in names}


BACKBONES: dict[str, BackboneSpec] = {
    **_spec(["VGG16", "VGG19"], "vgg16", 32, r"^(block\d+)_"),
    **_spec(["ResNet50", "ResNet101", "ResNet152"], "resnet", 32, r"^(conv\d_block\d+)_"),
    **_spec(["ResNet50V2", "ResNet101V2", "ResNet152V2"], "resnet_v2", 32, r"^(conv\d_block\d+)_"),
    **_spec(["InceptionV3"], "inception_v3", 75, None),
    **_spec(["InceptionResNetV2"], "inception_resnet_v2", 75, None),
    **_spec(["Xception"], "xception", 71, r"^(block\d+)_"),
    **_spec(["MobileNet"], "mobilenet", 32, r"^conv_(?:dw_|pw_|pad_)?(\d+)"),
    **_spec(["MobileNetV2"], "mobilenet_v2", 32, r"^(block_\d+|expanded_conv)_"),
    **_spec(["MobileNetV3Small", "MobileNetV3Large"], "mobilenet_v3", 32, r"^(expanded_conv(?:_\d+)?)_"),
    **_spec(["DenseNet121", "DenseNet169", "DenseNet201"], "densenet", 32, r"^(conv\d_block\d+|pool\d)_"),
    # NASNet names every layer of a cell after the cell (`normal_bn_1_7`, `adjust_conv_1_reduce_4`,
    # `separable_conv_1_reduction_left1_stem_2`); auto-named ReLUs (`activation_12`) must not match.
    **_spec(
        ["NASNetMobile", "NASNetLarge"], "nasnet", 32, r"^(?:normal|reduction|adjust|separable)_.*?_((?:stem_|reduce_)?\d+)$"
    ),
    **_spec([f"EfficientNetB{i}" for i in range(8)], "efficientnet", 32, r"^(block\d[a-z])_"),
    **_spec(
        [
            "EfficientNetV2B0",
            "EfficientNetV2B1",
            "EfficientNetV2B2",
            "EfficientNetV2B3",
            "EfficientNetV2S",
            "EfficientNetV2M",
            "EfficientNetV2L",
        ],
        "efficientnet_v2",
        32,
        r"^(block\d+[a-z])_",
    ),
    **_spec(["ConvNeXtTiny", "ConvNeXtSmall", "ConvNeXtBase"], "convnext", 32, None),
}
# VGG19 has its own module for preprocess_input (identical to VGG16's); keep it exact.
BACKBONES["VGG19"] = BackboneSpec("VGG19", "vgg19", 32, r"^(block\d+)_")

# Published ImageNet top-1 accuracy (%) of each constructor's default variant with its ImageNet
# weights: the keras.applications docs' table of available models, and for MobileNetV3 the table in
# its docstring (1.0 multiplier, 224 px). Screening ranks backbones by it as a trivial baseline that
# never looks at the user's data (harness/screening.py); a variant with other options (a MobileNet
# alpha) has no published figure here.
IMAGENET_TOP1: dict[str, float] = {
    "Xception": 79.0,
    "VGG16": 71.3,
    "VGG19": 71.3,
    "ResNet50": 74.9,
    "ResNet50V2": 76.0,
    "ResNet101": 76.4,
    "ResNet101V2": 77.2,
    "ResNet152": 76.6,
    "ResNet152V2": 78.0,
    "InceptionV3": 77.9,
    "InceptionResNetV2": 80.3,
    "MobileNet": 70.4,
    "MobileNetV2": 71.3,
    "MobileNetV3Small": 68.1,
    "MobileNetV3Large": 75.6,
    "DenseNet121": 75.0,
    "DenseNet169": 76.2,
    "DenseNet201": 77.3,
    "NASNetMobile": 74.4,
    "NASNetLarge": 82.5,
    "EfficientNetB0": 77.1,
    "EfficientNetB1": 79.1,
    "EfficientNetB2": 80.1,
    "EfficientNetB3": 81.6,
    "EfficientNetB4": 82.9,
    "EfficientNetB5": 83.6,
    "EfficientNetB6": 84.0,
    "EfficientNetB7": 84.3,
    "EfficientNetV2B0": 78.7,
    "EfficientNetV2B1": 79.8,
    "EfficientNetV2B2": 80.5,
    "EfficientNetV2B3": 82.0,
    "EfficientNetV2S": 83.9,
    "EfficientNetV2M": 85.3,
    "EfficientNetV2L": 85.7,
    "ConvNeXtTiny": 81.3,
    "ConvNeXtSmall": 82.3,
    "ConvNeXtBase": 85.3,
}


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; valid: {', '.join(sorted(BACKBONES))}") from None


def preprocess_fn(name: str):
    """The backbone's own `keras.applications.<module>.preprocess_input`."""
    import keras

    return getattr(keras.applications, get_spec(name).module).preprocess_input


# --- preprocessing as plain arithmetic -------------------------------------------------------

# What each module's preprocess_input does to RGB pixels 0..255 (keras/src/applications/
# imagenet_utils.py): "caffe" flips RGB to BGR and subtracts the ImageNet mean of each BGR channel,
# "tf" scales to [-1, 1], "torch" scales to [0, 1] then standardises each channel with ImageNet's
# mean and std; None: the backbone preprocesses inside itself and preprocess_input returns its input.
PREPROCESS_MODES: dict[str, str | None] = {
    "vgg16": "caffe",
    "vgg19": "caffe",
    "resnet": "caffe",
    "resnet_v2": "tf",
    "inception_v3": "tf",
    "inception_resnet_v2": "tf",
    "xception": "tf",
    "mobilenet": "tf",
    "mobilenet_v2": "tf",
    "nasnet": "tf",
    "densenet": "torch",
    "mobilenet_v3": None,
    "efficientnet": None,
    "efficientnet_v2": None,
    "convnext": None,
}
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_RGB_MEAN, _TORCH_RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PixelTransform:
    """`preprocess_input` as `flip(x) * scale + offset` per channel, so that a model can carry it in
    Keras' built-in layers (a channel flip and `Rescaling`) and load where the harness is absent."""

    flip_channels: bool  # RGB -> BGR before scaling (caffe)
    scale: tuple[float, float, float]  # per output channel
    offset: tuple[float, float, float]


def _per_channel(values: Iterable[float]) -> tuple[float, float, float]:
    """Three per-channel values as the fixed-length tuple PixelTransform holds."""
    first, second, third = values
    return first, second, third


def pixel_transform(name: str) -> PixelTransform:
    """The backbone's preprocess_input as a PixelTransform (pure: no Keras needed).

    >>> t = pixel_transform("ResNet50")  # caffe: BGR, minus the ImageNet mean
    >>> t.flip_channels, t.offset
    (True, (-103.939, -116.779, -123.68))
    """
    module = get_spec(name).module
    if module not in PREPROCESS_MODES:
        raise KeyError(f"no preprocessing known for keras.applications.{module} (backbone {name!r}): add it to PREPROCESS_MODES")
    mode = PREPROCESS_MODES[module]
    if mode == "caffe":
        return PixelTransform(True, (1.0, 1.0, 1.0), _per_channel(-m for m in _CAFFE_BGR_MEAN))
    if mode == "tf":
        return PixelTransform(False, (1 / 127.5,) * 3, (-1.0,) * 3)
    if mode == "torch":  # (x / 255 - mean) / std
        scale = _per_channel(1 / (255 * s) for s in _TORCH_RGB_STD)
        return PixelTransform(False, scale, _per_channel(-m / s for m, s in zip(_TORCH_RGB_MEAN, _TORCH_RGB_STD)))
    return PixelTransform(False, (1.0,) * 3, (0.0,) * 3)


def construct(name: str, image_size: int, weights: str | None, options: dict | None = None):
    """Build the headless backbone: `keras.applications.<name>(include_top=False, ...)`.

    `weights` is "imagenet" (downloaded and cached by Keras; needs internet once), None (random
    init), or the path of a weights file that this exact constructor produced.
    """
    import keras

    ctor = getattr(keras.applications, name)
    key = (name, image_size, weights, repr(sorted((options or {}).items())))
    cached = _LOADED_WEIGHTS.get(key) if weights is not None else None
    from_file = weights not in (None, "imagenet")
    model = ctor(
        include_top=False,
        weights=None if (from_file or cached is not None) else weights,
        input_shape=(image_size, image_size, 3),
        **(options or {}),
    )
    if cached is not None:
        model.set_weights(cached)
    elif from_file:
        model.load_weights(weights)
    if weights is not None and cached is None:
        _LOADED_WEIGHTS[key] = model.get_weights()
    return model


# Pretrained weights, read once per process: a warm trial process builds the same backbone for
# trial after trial, and re-reading a weights file (about 100 MB for ResNet50) each time is waste.
_LOADED_WEIGHTS: dict[tuple, list] = {}


# --- block structure -------------------------------------------------------------------------


def _history_refs(obj) -> list[str]:
    """Names of the layers whose outputs a serialized inbound-node structure refers to."""
    found: list[str] = []
    if isinstance(obj, dict):
        if "keras_history" in obj.get("config", {}) if isinstance(obj.get("config"), dict) else False:
            found.append(obj["config"]["keras_history"][0])
        else:
            for v in obj.values():
                found.extend(_history_refs(v))
    elif isinstance(obj, (list, tuple)):
        # Older serialisations store a bare [layer_name, node_index, tensor_index, ...] list.
        if len(obj) >= 3 and isinstance(obj[0], str) and isinstance(obj[1], int):
            found.append(obj[0])
        else:
            for v in obj:
                found.extend(_history_refs(v))
    return found


def clean_cut_points(layer_inputs: list[tuple[str, list[str]]]) -> list[int]:
    """Indices i after which the graph can be cut with exactly one live tensor.

    `layer_inputs` lists the layers in topological order with the names of the layers they read.
    A cut after layer i is clean when layer i's output is the only tensor produced at or before i
    that is still read after i: no skip connection crosses it. Cutting anywhere else would split a
    residual or inception block in two.
    """
    position = {name: i for i, (name, _) in enumerate(layer_inputs)}
    last_use = {name: position[name] for name, _ in layer_inputs}
    for i, (_, inputs) in enumerate(layer_inputs):
        for src in inputs:
            last_use[src] = max(last_use[src], i)
    cuts = []
    for i, (name, _) in enumerate(layer_inputs[:-1]):
        live = [n for n, _ in layer_inputs[: i + 1] if last_use[n] > i]
        if live == [name]:
            cuts.append(i)
    return cuts


def split_cells(piece: list[str], keys: dict[str, str], reads: dict[str, list[str]]) -> list[list[str]]:
    """Split a piece that holds several named cells into one block per cell, or keep it whole.

    NASNet's cells each read the outputs of the *two* cells before them, so no single tensor ever
    separates two cells and `clean_cut_points` finds no cut inside the stack. The cells are still
    the architecture's blocks: unfreezing the top k cells trains whole cells that read frozen,
    finished outputs of the cells below. `keys` maps a layer to its cell (from the block pattern);
    an unnamed layer (Keras' `activation_12`) joins the earliest cell that reads it, so every layer
    a frozen cell reads stays frozen too. The split is kept only if it is clean: a later cell reads
    nothing from an earlier one but that cell's output (its last layer), and nothing flows back.
    """
    position = {n: i for i, n in enumerate(piece)}
    readers: dict[str, list[str]] = {n: [] for n in piece}
    for n in piece:
        for src in reads.get(n, []):
            if src in readers:
                readers[src].append(n)
    # Cells in the order of their outputs; an unnamed layer takes its earliest reader's cell.
    cell_end: dict[str, int] = {}
    for n in piece:
        if n in keys:
            cell_end[keys[n]] = position[n]
    if len(cell_end) < 2:
        return [piece]
    order = {k: i for i, k in enumerate(sorted(cell_end, key=lambda k: cell_end[k]))}
    cell: dict[str, int] = {}
    for n in reversed(piece):  # readers come later in topological order: already assigned
        if n in keys:
            cell[n] = order[keys[n]]
        else:
            cell[n] = min((cell[r] for r in readers[n]), default=len(order) - 1)
    cells: list[list[str]] = [[] for _ in order]
    for n in piece:
        cells[cell[n]].append(n)
    for n in piece:
        for r in readers[n]:
            if cell[r] < cell[n] or (cell[r] > cell[n] and n != cells[cell[n]][-1]):
                return [piece]  # the names do not describe self-contained cells: keep it whole
    return [c for c in cells if c]


def group_blocks(
    layer_names: list[str],
    cuts: list[int],
    pattern: str | None,
    reads: dict[str, list[str]] | None = None,
) -> list[list[str]]:
    """Split layers into blocks at clean cuts, then merge the pieces that form one block.

    Pure: takes names, cut indices and the graph's edges, so it is tested without building a model.
    - A piece whose layers carry several block keys is split into its cells (`split_cells`, needs
      `reads`: layer name -> names of the layers it reads) when that split is clean.
    - Pieces whose layer names share a block key (`pattern`'s first group) form one block; an
      unnamed piece (e.g. Keras' auto-named `re_lu`) between two pieces of one block joins it.
    - Runs of unkeyed single-layer pieces (a plain conv -> bn -> relu stem or top) form one block.
    - An unkeyed piece of several layers (it contains a branch: an inception module) stays whole.
    """
    pieces: list[list[str]] = []
    start = 0
    for c in cuts + [len(layer_names) - 1]:
        if layer_names[start : c + 1]:
            pieces.append(layer_names[start : c + 1])
        start = c + 1
    regex = re.compile(pattern) if pattern else None
    if regex is not None and reads is not None:
        keys_of = {n: m.group(1) for n in layer_names if (m := regex.match(n))}
        pieces = [cell for piece in pieces for cell in split_cells(piece, keys_of, reads)]

    def key(piece: list[str]):
        if regex is None:
            return None
        keys = {m.group(1) for n in piece if (m := regex.match(n))}
        return keys.pop() if len(keys) == 1 else None

    keys = [key(p) for p in pieces]
    for i, k in enumerate(keys):
        if k is None:
            before = next((keys[j] for j in range(i - 1, -1, -1) if keys[j] is not None), None)
            after = next((keys[j] for j in range(i + 1, len(keys)) if keys[j] is not None), None)
            if before is not None and before == after:
                keys[i] = before

    blocks: list[list[str]] = []
    prev: object = object()  # sentinel: never equal to a key
    for piece, k in zip(pieces, keys):
        if k is not None:
            same = blocks and k == prev
        else:
            # unkeyed: a chain of single layers merges with the unkeyed chain before it
            same = blocks and prev == ("chain",) and len(piece) == 1
            k = ("chain",) if len(piece) == 1 else ("branch", len(blocks))
        if same:
            blocks[-1].extend(piece)
        else:
            blocks.append(list(piece))
        prev = k
    return blocks


def merge_weightless(blocks: list[list[str]], weighted: set[str]) -> list[list[str]]:
    """Merge every block that owns no trainable weight into a neighbour, so each block trains.

    `weighted` names the layers that train once their block is unfrozen (see `_trains_when_unfrozen`:
    BatchNormalization never does). Without this, ResNetV2's top `post_bn`/`post_relu`, DenseNet's
    `bn`/`relu` and NASNet's final ReLU were blocks of their own, and "unfreeze 1 block" trained
    nothing but the head.

    Which neighbour: the block *below* (towards the input). The weightless pieces between blocks
    are what finishes the block below: its output activation (InceptionResNetV2's `block35_1_ac`
    after each residual sum) or the final normalisation. Kept with that block, a block's last
    layer is its finished output, which is where an intermediate-feature cut takes its features
    (`build_model` cuts after `blocks[keep - 1][-1]`). What trains for "unfreeze the top k" is the
    same either way, since these layers carry nothing to train. A weightless stem (e.g. a lone
    Rescaling) has no block below, so it joins the first block above that has weights.
    """
    merged: list[list[str]] = []
    stem: list[str] = []
    for block in blocks:
        if any(n in weighted for n in block):
            merged.append(stem + block)
            stem = []
        elif merged:
            merged[-1].extend(block)
        else:
            stem.extend(block)
    if stem:  # nothing trainable at all: one block
        merged.append(stem)
    return merged


def _trains_when_unfrozen(layer) -> bool:
    """Whether unfreezing this layer gives the optimizer a weight to train.

    BatchNormalization never does: the freeze policy keeps it frozen even inside unfrozen blocks
    (`model.set_backbone_trainable`). LayerNormalization is trainable, but a block that is only a
    per-channel scale and shift (ConvNeXt's final norm) is no block of features either, so no
    normalisation layer makes a block on its own. Nested models (ConvNeXt's stem) count whole.
    """
    import keras

    norms = (keras.layers.BatchNormalization, keras.layers.LayerNormalization, keras.layers.GroupNormalization)
    return not isinstance(layer, norms) and any(v.trainable for v in layer.weights)


def backbone_blocks(backbone, name: str) -> list[list[str]]:
    """The backbone's layers (input layer excluded) grouped into blocks, input to output.

    Names are of the graph's operations, so a few are not layers (`backbone.get_layer` fails on
    them): ConvNeXt's residual sums and MobileNetV3's hard-sigmoid arithmetic are plain ops
    (`add_3`). Use `output_of` to read any of them. Every block owns at least one weight that the
    freeze policy trains (`merge_weightless`).
    """
    config = backbone.get_config()
    layer_inputs = [(lc["name"], _history_refs(lc.get("inbound_nodes", []))) for lc in config["layers"]]
    cuts = clean_cut_points(layer_inputs)
    names = [n for n, _ in layer_inputs]
    blocks = group_blocks(names, cuts, get_spec(name).block_pattern, dict(layer_inputs))
    input_names = {backbone.layers[0].name}
    blocks = [[n for n in b if n not in input_names] for b in blocks]
    weighted = {layer.name for layer in backbone.layers if _trains_when_unfrozen(layer)}
    return merge_weightless([b for b in blocks if b], weighted)


def count_blocks(name: str, image_size: int, weights: str | None, options: dict | None = None) -> int:
    """How many blocks backbone `name` has, built once with `weights` (so weights that do not fit
    fail here, before any trial: harness/preflight.py `resolve_weights`). Keras' session is
    cleared afterwards: the sweep process keeps no model."""
    import keras

    count = len(backbone_blocks(construct(name, image_size, weights, options), name))
    keras.backend.clear_session()
    return count


def output_of(backbone, name: str):
    """The output tensor of the backbone's operation `name`, a layer or a plain op (see above)."""
    return next(op.output for op in backbone.operations if op.name == name)
