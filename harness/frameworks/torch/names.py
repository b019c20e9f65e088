"""Torch backbone names: `torchvision/<name>` and `timm/<name>`.

`name_problem` checks the syntax alone and imports nothing (config load); `install_problem` says
which packages are missing without importing them; `existence_problem` imports the zoo and looks
the name up, offering the closest names (preflight).

    >>> name_problem("torchvision/resnet50"), name_problem("timm/")
    (None, "timm/: no model name after 'timm/'")
"""

from __future__ import annotations

import difflib
import importlib.util

from harness.zoo import backbone_name_problem

INSTALL = 'pip install -e ".[torch]"'  # the extra in pyproject.toml
# What each zoo needs installed: timm builds on torchvision's transforms.
ZOO_PACKAGES = {"torchvision": ("torch", "torchvision"), "timm": ("torch", "torchvision", "timm")}


class BackboneError(ValueError):
    """A torch backbone that cannot be built as named: unknown, not installed, no blocks, weights
    that cannot be fetched or do not fit. Raised before anything is written (preflight builds each
    backbone once). Not a ConfigError: harness/config.py may import this module for `name_problem`."""


def split_name(backbone: str) -> tuple[str, str]:
    """("torchvision", "resnet50") for "torchvision/resnet50"; BackboneError for a bad name."""
    problem = name_problem(backbone)
    if problem:
        raise BackboneError(problem)
    zoo, _, model = backbone.partition("/")
    return zoo, model


def name_problem(backbone: str) -> str | None:
    """What is wrong with a torch backbone's name as written, or None. Pure: imports nothing."""
    return backbone_name_problem(backbone)


def missing_packages(backbone: str) -> list[str]:
    """The packages `backbone`'s zoo needs that are not installed (found without importing them)."""
    zoo = backbone.partition("/")[0]
    return [p for p in ZOO_PACKAGES.get(zoo, ()) if importlib.util.find_spec(p) is None]


def install_problem(backbone: str) -> str | None:
    """None when the packages `backbone` needs are installed, else what to install."""
    missing = missing_packages(backbone)
    if not missing:
        return None
    verb = "is" if len(missing) == 1 else "are"
    return f"{backbone} is a PyTorch backbone, and {', '.join(missing)} {verb} not installed: {INSTALL}"


def _import_zoos() -> None:
    """torch and torchvision, imported as this process can (harness/frameworks/torch/device.py)."""
    from harness.frameworks.torch.device import import_quietly

    import_quietly()


def model_names(zoo: str) -> list[str]:
    """Every model a zoo can build: torchvision's classification builders, timm's architectures."""
    _import_zoos()
    if zoo == "torchvision":
        import torchvision

        return list(torchvision.models.list_models(module=torchvision.models))
    import timm

    return list(timm.list_models())


def closest(name: str, names: list[str], n: int = 5) -> list[str]:
    """Up to `n` of `names` closest to `name` (difflib's ratio), best first."""
    return difflib.get_close_matches(name, names, n=n, cutoff=0.5)


def existence_problem(backbone: str) -> str | None:
    """None when `backbone` names a model its zoo can build, else why not (with the closest names).
    Imports the zoo: preflight, in a process that trains torch backbones."""
    problem = name_problem(backbone) or install_problem(backbone)
    if problem:
        return problem
    zoo, _, model = backbone.partition("/")
    if zoo == "timm":
        _import_zoos()
        import timm

        if timm.is_model(model):  # the architecture, with or without a pretrained tag
            return None
        names = model_names(zoo)
        arch = model.partition(".")[0]
    else:
        names = model_names(zoo)
        if model in names:
            return None
        arch = model
    near = closest(arch, names)
    hint = f"; closest: {', '.join(f'{zoo}/{n}' for n in near)}" if near else ""
    return f"{backbone}: {zoo} has no model {arch!r}{hint}"


def check_exists(backbone: str) -> None:
    """BackboneError unless `backbone` names a model its zoo can build."""
    problem = existence_problem(backbone)
    if problem:
        raise BackboneError(problem)
