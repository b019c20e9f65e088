"""Block structure: clean cuts and block grouping, pure and on real keras.applications models."""

from __future__ import annotations

import pytest

from harness import backbones as bb


def test_clean_cuts_skip_over_a_residual_connection():
    # a -> b -> c -> add(b, c) -> d : no cut after c, since b's output is still live there
    graph = [("a", []), ("b", ["a"]), ("c", ["b"]), ("add", ["b", "c"]), ("d", ["add"])]
    assert bb.clean_cut_points(graph) == [0, 1, 3]


def test_group_blocks_merges_named_pieces_and_stem_chain():
    names = ["conv1", "bn1", "relu1", "block1_a", "block1_b", "block1_add", "re_lu", "block1_c", "block2_a", "top"]
    cuts = list(range(len(names) - 1))  # every point is a clean cut in a plain chain
    blocks = bb.group_blocks(names, cuts, r"^(block\d+)_")
    assert blocks == [["conv1", "bn1", "relu1"], ["block1_a", "block1_b", "block1_add", "re_lu", "block1_c"], ["block2_a"], ["top"]]


def test_group_blocks_without_pattern_keeps_branchy_pieces_whole():
    names = ["s1", "s2", "m1", "m2", "m3", "t"]
    blocks = bb.group_blocks(names, [0, 1, 4], None)  # m1..m3 is a branchy piece
    assert blocks == [["s1", "s2"], ["m1", "m2", "m3"], ["t"]]


@pytest.mark.parametrize(
    "name, size, options, n_blocks, first_of_block_2",
    [
        ("MobileNetV2", 32, {"alpha": 0.35}, 19, "block_1_expand"),
        ("ResNet50", 32, {}, 17, "conv2_block2_1_conv"),
        ("EfficientNetB0", 32, {}, 18, "block2a_expand_conv"),
        ("InceptionV3", 75, {}, 12, "conv2d_15"),
    ],
)
def test_real_backbones_split_at_their_block_boundaries(name, size, options, n_blocks, first_of_block_2):
    model = bb.construct(name, size, None, options)
    blocks = bb.backbone_blocks(model, name)
    assert len(blocks) == n_blocks
    assert blocks[2][0] == first_of_block_2
    # every layer but the input belongs to exactly one block
    flat = [n for b in blocks for n in b]
    assert sorted(flat) == sorted(layer.name for layer in model.layers[1:])


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
