"""Source pretraining: the shipped source backbone stays findable, its key must not move when config keys are added."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("config", ["sweeps/demo.yaml", "sweeps/quadrants-demo.yaml"])
def test_the_offline_demos_find_the_shipped_source_weights(config):
    from harness.config import load_config
    from harness.pretrain import ASSETS, find_source_weights
    from tests.conftest import ROOT

    cfg = load_config(ROOT / config)
    for backbone in cfg.search["backbone"].choices or (cfg.search["backbone"].value,):
        found = find_source_weights(cfg, backbone)
        assert found is not None and found.parent == ASSETS, (
            f"the demo would pretrain {backbone} for minutes instead of using the asset"
        )


def test_a_missing_source_backbone_is_pretrained_once_then_found_in_its_cache(tmp_path):
    """What a `weights: source` sweep does before its first trial when neither harness/assets/ nor the
    cache holds its key: pretrain on the source set, save the backbone under its key, then find the
    file without training again. (The end-to-end sweeps use the shipped files, to stay short.)"""
    import json

    from harness import backbones as bb
    from harness.config import parse_config
    from harness.pretrain import ensure_source_weights, weights_filename

    cfg = parse_config(
        f"""
study: {{name: src}}
data: {{source: builtin, name: shapes, image_size: 32, builtin_size: 10, classes: [pentagon, star4, three_dots]}}
source:
  data: {{source: builtin, name: shapes-source, image_size: 32, builtin_size: 10}}
  epochs: 1
  batch_size: 32
  cache_dir: {tmp_path / "sources"}
model:
  weights: source
  backbone_options:
    MobileNet: {{alpha: 0.25}}
search:
  backbone: MobileNet
""",
        "s.yaml",
    )
    lines: list[str] = []
    path = ensure_source_weights(cfg, "MobileNet", log=lines.append)
    assert path == tmp_path / "sources" / weights_filename(cfg, "MobileNet") and path.is_file()
    assert lines[0].startswith("pretraining the source backbone MobileNet on shapes-source")
    report = json.loads(path.with_suffix("").with_suffix(".json").read_text())
    assert report["backbone"] == "MobileNet" and report["epochs"] == 1 and report["train_images"] > 0
    bb.construct("MobileNet", 32, str(path), {"alpha": 0.25})  # the saved weights fit the backbone
    again: list[str] = []
    assert ensure_source_weights(cfg, "MobileNet", log=again.append) == path and again == []
