"""Torch backbone names: the syntax without torch, the packages it needs, unknown names with the closest ones."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from harness.frameworks import framework_of
from harness.frameworks.torch.names import (
    INSTALL,
    BackboneError,
    check_exists,
    existence_problem,
    install_problem,
    name_problem,
    split_name,
)
from tests.conftest import ROOT

pytest.importorskip("torchvision")


def test_the_syntax_is_checked_without_importing_anything():
    assert framework_of("torchvision/vgg16") == framework_of("timm/convnext_tiny") == "torch"
    assert name_problem("torchvision/resnet50") is None
    assert name_problem("timm/vit_small_patch16_224.augreg_in21k") is None  # timm's pretrained tag
    assert "no model name" in name_problem("timm/")
    assert "not a model name" in name_problem("torchvision/res net")
    assert "<zoo>/<model>" in name_problem("keras/MobileNetV2")
    assert split_name("timm/resnet18") == ("timm", "resnet18")
    with pytest.raises(BackboneError, match="no model name"):
        split_name("torchvision/")


def test_the_name_module_and_the_package_import_no_torch():
    code = (
        "import sys, json\n"
        "import harness.frameworks.torch\n"
        "from harness.frameworks.torch.names import name_problem, install_problem\n"
        "name_problem('timm/resnet18'); install_problem('timm/resnet18')\n"
        "print(json.dumps([m for m in ('torch', 'torchvision', 'timm', 'tensorflow', 'keras') if m in sys.modules]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_a_torch_backbone_without_torch_installed_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "timm") else real(name, *a))
    problem = install_problem("timm/resnet18")
    assert problem is not None and "torch, timm are not installed" in problem and INSTALL in problem
    assert INSTALL in existence_problem("torchvision/resnet18")


def test_an_unknown_name_fails_with_the_closest_names():
    problem = existence_problem("torchvision/resnet5")
    assert "torchvision has no model 'resnet5'" in problem and "torchvision/resnet50" in problem
    assert "timm/convnext_tiny" in existence_problem("timm/convnext_tinyy")
    assert existence_problem("timm/resnet18.a1_in1k") is None  # a pretrained tag on a known architecture
    assert existence_problem("torchvision/mobilenet_v3_small") is None
    with pytest.raises(BackboneError, match="closest: .*torchvision/vgg16"):
        check_exists("torchvision/vgg61")
