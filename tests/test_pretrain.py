"""Source pretraining. The shipped source backbones stay findable, small, and loadable: their key must not move when
config keys are added, and each file must load into the backbone its demo builds."""

from __future__ import annotations

import pytest

DEMOS = ["sweeps/demo.yaml", "sweeps/quadrants-demo.yaml", "sweeps/zoo-demo.yaml", "sweeps/torch-demo.yaml"]
MAX_ASSET_BYTES = 20 * 1024 * 1024  # the repository stays small


def _demo_backbones(config: str):
    from harness.config import backbone_candidates, load_config
    from tests.conftest import ROOT

    cfg = load_config(ROOT / config)
    return cfg, backbone_candidates(cfg.search)


@pytest.mark.parametrize("config", DEMOS)
def test_the_offline_demos_find_the_shipped_source_weights(config):
    from harness.pretrain import ASSETS, find_source_weights

    cfg, backbones = _demo_backbones(config)
    for backbone in backbones:
        found = find_source_weights(cfg, backbone)
        assert found is not None and found.parent == ASSETS, f"the demo would pretrain {backbone} for minutes, not use the asset"


def test_the_zoo_ships_four_keras_families_and_a_torch_one():
    _, backbones = _demo_backbones("sweeps/zoo-demo.yaml")
    assert sorted(backbones) == [
        "EfficientNetB0",
        "MobileNet",
        "MobileNetV2",
        "MobileNetV3Small",
        "torchvision/mobilenet_v3_small",
    ]


def test_every_shipped_asset_is_small_used_by_a_demo_and_loads_into_its_backbone():
    from harness.frameworks import framework_for
    from harness.pretrain import ASSETS, beside, find_source_weights

    used = {}
    for config in DEMOS:
        cfg, backbones = _demo_backbones(config)
        for backbone in backbones:
            options = cfg.model.backbone_options.get(backbone, {})
            used[find_source_weights(cfg, backbone)] = (backbone, cfg.source.data.image_size, options)
    shipped = sorted(p for p in ASSETS.iterdir() if p.suffix != ".json")
    assert shipped and set(shipped) == set(used), "every shipped file is some demo's source backbone, and no demo lacks one"
    for path in shipped:
        assert path.stat().st_size < MAX_ASSET_BYTES, f"{path.name}: {path.stat().st_size / 2**20:.1f} MiB"
        backbone, size, options = used[path]
        assert beside(path, backbone, ".json").is_file(), f"{path.name}: its pretraining report is missing"
        # Raises on a file another constructor made (Keras), or a state dict that does not fit (torch).
        assert framework_for(backbone).backbone_blocks(backbone, size, str(path), options) > 1


@pytest.mark.slow  # two short pretrainings: about a minute of CPU
def test_pretraining_again_in_the_same_process_writes_the_same_file(tmp_path):
    # `--ship` without --backbone pretrains every backbone in one process, and a sweep pretrains a
    # missing one after building others: the weights must not depend on what ran before.
    from harness.pretrain import pretrain

    cfg, _ = _demo_backbones("sweeps/zoo-demo.yaml")
    tiny = cfg.source.model_copy(update={"epochs": 1, "data": cfg.source.data.model_copy(update={"builtin_size": 12})})
    cfg = cfg.model_copy(update={"source": tiny})
    first, second = tmp_path / "first.weights.h5", tmp_path / "second.weights.h5"
    pretrain(cfg, "MobileNet", first, log=lambda *_: None)
    pretrain(cfg, "MobileNet", second, log=lambda *_: None)
    assert first.read_bytes() == second.read_bytes()


def test_a_missing_source_backbone_is_pretrained_once_then_found_in_its_cache(tmp_path):
    """What a `weights: source` sweep does before its first trial when neither harness/assets/ nor the
    cache holds its key: pretrain on the source set, save the backbone under its key, then find the
    file without training again. (The end-to-end sweeps use the shipped files, to stay short.)"""
    import json

    from harness.config import parse_config
    from harness.frameworks.keras import backbones as bb
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
