"""Block structure: clean cuts and block grouping, pure and on real keras.applications models."""

from __future__ import annotations

import keras
import pytest

from harness.frameworks.keras import backbones as bb


def test_clean_cuts_skip_over_a_residual_connection():
    # a -> b -> c -> add(b, c) -> d : no cut after c, since b's output is still live there
    graph = [("a", []), ("b", ["a"]), ("c", ["b"]), ("add", ["b", "c"]), ("d", ["add"])]
    assert bb.clean_cut_points(graph) == [0, 1, 3]


def test_group_blocks_merges_named_pieces_and_stem_chain():
    names = ["conv1", "bn1", "relu1", "block1_a", "block1_b", "block1_add", "re_lu", "block1_c", "block2_a", "top"]
    cuts = list(range(len(names) - 1))  # every point is a clean cut in a plain chain
    blocks = bb.group_blocks(names, cuts, r"^(block\d+)_")
    assert blocks == [
        ["conv1", "bn1", "relu1"],
        ["block1_a", "block1_b", "block1_add", "re_lu", "block1_c"],
        ["block2_a"],
        ["top"],
    ]


def test_group_blocks_without_pattern_keeps_branchy_pieces_whole():
    names = ["s1", "s2", "m1", "m2", "m3", "t"]
    blocks = bb.group_blocks(names, [0, 1, 4], None)  # m1..m3 is a branchy piece
    assert blocks == [["s1", "s2"], ["m1", "m2", "m3"], ["t"]]


def test_split_cells_cuts_cross_connected_cells_at_their_outputs():
    # NASNet-like: each cell reads the previous cell's output and, through an "adjust" layer, the
    # one before; so after the stem no single tensor separates two cells. Keras orders the graph
    # by depth, so c2_adjust comes before c1 has finished.
    graph = [
        ("stem", []),
        ("c1_conv", ["stem"]),
        ("c2_adjust", ["stem"]),
        ("c1_out", ["c1_conv", "stem"]),
        ("c2_conv", ["c1_out"]),
        ("c2_out", ["c2_adjust", "c2_conv"]),
        ("relu", ["c1_out"]),
        ("c3_adjust", ["relu"]),
        ("c3_conv", ["c2_out"]),
        ("c3_out", ["c3_adjust", "c3_conv"]),
    ]
    names, reads = [n for n, _ in graph], dict(graph)
    cuts = bb.clean_cut_points(graph)
    assert cuts == [0]
    assert bb.group_blocks(names, cuts, r"^(c\d)_", reads) == [
        ["stem"],
        ["c1_conv", "c1_out"],
        ["c2_adjust", "c2_conv", "c2_out"],
        ["relu", "c3_adjust", "c3_conv", "c3_out"],  # an unnamed layer joins the cell that reads it
    ]
    # A later cell reading a tensor from inside an earlier one: the names are not cells, keep whole.
    reads["c3_conv"] = ["c2_conv"]
    assert bb.group_blocks(names, cuts, r"^(c\d)_", reads) == [["stem"], names[1:]]
    assert bb.group_blocks(names, cuts, r"^(c\d)_") == [["stem"], names[1:]]  # no graph: no split


def test_weightless_blocks_merge_below_and_a_weightless_stem_merges_above():
    blocks = [["rescale"], ["conv1", "bn1"], ["b1_conv", "b1_add"], ["b1_ac"], ["b2_conv"], ["post_bn", "post_relu"]]
    weighted = {"conv1", "b1_conv", "b2_conv"}  # BN never counts: the freeze policy keeps it frozen
    assert bb.merge_weightless(blocks, weighted) == [
        ["rescale", "conv1", "bn1"],
        ["b1_conv", "b1_add", "b1_ac"],
        ["b2_conv", "post_bn", "post_relu"],
    ]
    assert bb.merge_weightless([["a"], ["b"]], set()) == [["a", "b"]]


# Blocks per registry entry, built at its minimum input size with random weights. Before blocks
# with nothing to train were merged, ResNetV2, DenseNet and ConvNeXt had one more each (a top of
# post_bn/post_relu, bn/relu, the final LayerNormalization) and InceptionResNetV2 had 84 (each
# residual's `_ac` ReLU alone); NASNet had 3 (stem, every cell in one, top ReLU) before its cells
# were split.
BLOCKS = {
    "VGG16": 5,
    "VGG19": 5,
    "ResNet50": 17,
    "ResNet101": 34,
    "ResNet152": 51,
    "ResNet50V2": 17,
    "ResNet101V2": 34,
    "ResNet152V2": 51,
    "InceptionV3": 12,
    "InceptionResNetV2": 45,
    "Xception": 14,
    "MobileNet": 14,
    "MobileNetV2": 19,
    "MobileNetV3Small": 13,
    "MobileNetV3Large": 17,
    "DenseNet121": 62,
    "DenseNet169": 86,
    "DenseNet201": 102,
    "NASNetMobile": 17,
    "NASNetLarge": 23,
    "EfficientNetB0": 18,
    "EfficientNetB1": 25,
    "EfficientNetB2": 25,
    "EfficientNetB3": 28,
    "EfficientNetB4": 34,
    "EfficientNetB5": 41,
    "EfficientNetB6": 47,
    "EfficientNetB7": 57,
    "EfficientNetV2B0": 23,
    "EfficientNetV2B1": 29,
    "EfficientNetV2B2": 30,
    "EfficientNetV2B3": 34,
    "EfficientNetV2S": 42,
    "EfficientNetV2M": 59,
    "EfficientNetV2L": 81,
    "ConvNeXtTiny": 22,
    "ConvNeXtSmall": 40,
    "ConvNeXtBase": 40,
}
# (block index, a layer it holds): where blocks start, and where the weightless tops went.
LANDMARKS = {
    "MobileNetV2": [(2, "block_1_expand")],
    "ResNet50": [(2, "conv2_block2_1_conv")],
    "EfficientNetB0": [(2, "block2a_expand_conv")],
    "InceptionV3": [(2, "conv2d_15")],
    "ResNet50V2": [(-1, "conv5_block3_1_conv"), (-1, "post_relu")],
    "DenseNet121": [(-1, "conv5_block16_1_conv"), (-1, "relu")],
    "InceptionResNetV2": [(2, "block35_1_conv"), (2, "block35_1_ac")],
    "NASNetMobile": [(1, "reduction_concat_stem_1"), (3, "normal_concat_0"), (-1, "normal_concat_12")],
    "ConvNeXtTiny": [(-1, "convnext_tiny_stage_3_block_2_depthwise_conv"), (-1, "layer_normalization")],
}


@pytest.fixture
def fresh_keras():
    """Auto-generated names (`conv2d_15`) restart from zero, and each build's memory is freed."""
    keras.backend.clear_session()
    yield
    keras.backend.clear_session()


# Every registry entry, not one per family: all 38 take about 75 s here (2 busy CPU cores, under
# the ~90 s this test may cost), and the members of a family differ in depth and, for NASNet, in
# cell layout, which is what block detection has to get right.
@pytest.mark.parametrize("name", list(bb.BACKBONES))
def test_every_backbone_splits_into_clean_blocks_that_each_train(name, fresh_keras):
    from harness.frameworks.keras.model import ModelSpec, TransferModel, set_backbone_trainable

    size = bb.get_spec(name).min_size
    backbone = bb.construct(name, size, None, {})
    blocks = bb.backbone_blocks(backbone, name)
    assert len(blocks) == BLOCKS[name]
    for index, layer in LANDMARKS.get(name, []):
        assert layer in blocks[index], (index, layer)

    # every operation but the input belongs to exactly one block
    graph = [(lc["name"], bb._history_refs(lc["inbound_nodes"])) for lc in backbone.get_config()["layers"]]
    block_of = {n: i for i, b in enumerate(blocks) for n in b}
    assert sorted(block_of) == sorted(n for n, _ in graph[1:]) and len(block_of) == sum(map(len, blocks))
    # no block is split: a block reads from later blocks nothing, and from earlier ones only outputs
    for dst, srcs in graph[1:]:
        for src in srcs:
            if src in block_of and block_of[src] != block_of[dst]:
                assert block_of[src] < block_of[dst] and src == blocks[block_of[src]][-1], (src, dst)

    # The freeze policy as phase 2 applies it to a pretrained backbone (BN kept frozen); the random
    # weights do not matter to it, only `spec.pretrained`.
    tm = TransferModel(backbone, backbone, blocks, ModelSpec(name, size, 2, "imagenet", {}))
    set_backbone_trainable(tm, 1)
    top = set(blocks[-1])
    assert len(backbone.trainable_weights) > 0, "unfreezing the top block must train something"
    assert {l.name for l in backbone.layers if l.trainable_weights} <= top
    set_backbone_trainable(tm, len(blocks))
    training = {l.name for l in backbone.layers if l.trainable_weights}
    assert [i for i, b in enumerate(blocks) if not training & set(b)] == [], "a block that trains nothing"


def test_unknown_backbone_lists_the_valid_names():
    with pytest.raises(KeyError, match="valid: .*MobileNetV2"):
        bb.get_spec("MobileNetV9")


def test_pretrained_weights_are_read_once_per_process(tmp_path):
    """A warm trial process builds the same backbone trial after trial: the file is read once."""
    import numpy as np

    path = tmp_path / "w.weights.h5"
    bb.construct("MobileNetV2", 32, None, {"alpha": 0.35}).save_weights(path)
    first = bb.construct("MobileNetV2", 32, str(path), {"alpha": 0.35})
    path.unlink()  # a second read would fail now
    again = bb.construct("MobileNetV2", 32, str(path), {"alpha": 0.35})
    assert all(np.array_equal(a, b) for a, b in zip(first.get_weights(), again.get_weights()))


# One backbone per keras.applications module: each module has its own preprocess_input.
_ONE_PER_MODULE = list({spec.module: name for name, spec in reversed(list(bb.BACKBONES.items()))}.values())


@pytest.mark.parametrize("name", _ONE_PER_MODULE)
def test_preprocessing_in_built_in_layers_matches_preprocess_input(name):
    """The model carries preprocessing as a channel flip and Rescaling (loads without the harness):
    on random uint8 images and on the float pixels augmentation makes, it gives what the module's
    own preprocess_input gives, to float32 rounding (caffe and identity exactly)."""
    import numpy as np

    from harness.frameworks.keras.model import preprocessing

    rng = np.random.default_rng(0)
    for pixels in (rng.integers(0, 256, (4, 9, 7, 3)).astype("uint8"), rng.uniform(0, 255, (2, 5, 5, 3))):
        expected = bb.preprocess_fn(name)(pixels.astype("float32"))
        got = np.asarray(preprocessing(name)(pixels))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
        if bb.PREPROCESS_MODES[bb.get_spec(name).module] in ("caffe", None):
            np.testing.assert_array_equal(got, expected)


def test_every_registered_module_has_a_known_preprocessing():
    assert {spec.module for spec in bb.BACKBONES.values()} <= set(bb.PREPROCESS_MODES)
    assert len(_ONE_PER_MODULE) == len({spec.module for spec in bb.BACKBONES.values()})
    caffe = bb.pixel_transform("VGG16")
    assert caffe.flip_channels and caffe.offset == (-103.939, -116.779, -123.68)
    assert not bb.pixel_transform("EfficientNetB0").flip_channels
