"""The shipped source backbone stays findable: its key must not move when config keys are added."""

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
        assert found is not None and found.parent == ASSETS, f"the demo would pretrain {backbone} for minutes instead of using the asset"
