"""Read-only checks before the night: what a loaded config names must be there and usable, so a
sweep that cannot run stops before anything is written, naming the key and its file:line:col.

The config's schema (harness/config.py) checks the YAML alone; everything here reads the disk.

    >>> config_file_problems(load_config("sweeps/demo.yaml"))
    []
"""

from __future__ import annotations

from pathlib import Path

from harness.config import DataConfig, SweepConfig, class_map_summary

# --- config files ---------------------------------------------------------------------------------


def config_file_problems(cfg: SweepConfig) -> list[str]:
    """Every file and folder the config names that is missing or does not fit, each as
    'file:line:col: key: problem' (empty: all there)."""
    problems = weights_file_problems(cfg)
    for key, data in used_data_blocks(cfg):
        problems += dataset_folder_problems(cfg, key, data)
    return problems


def used_data_blocks(cfg: SweepConfig) -> list[tuple[str, DataConfig]]:
    """The data blocks a sweep reads, each with its dotted key: a quadrant sweep reads its
    targets' (its top-level data block is unused), any sweep with a source block the source's."""
    if cfg.quadrants is not None:
        blocks = [(f"quadrants.targets[{i}].data", t.data) for i, t in enumerate(cfg.quadrants.targets)]
    else:
        blocks = [("data", cfg.data)]
    return blocks + ([("source.data", cfg.source.data)] if cfg.source is not None else [])


def weights_file_problems(cfg: SweepConfig) -> list[str]:
    """model.weights naming a file: the file must exist."""
    weights = cfg.model.weights
    if weights in ("imagenet", "none", "source") or Path(weights).is_file():
        return []
    return [f"{cfg.where('model.weights')}: model.weights: weights file not found: {weights}"]


def dataset_folder_problems(cfg: SweepConfig, key: str, data: DataConfig) -> list[str]:
    """A folder dataset's root must exist, and its class_map must name its sub-folders: each class
    once, every class mapped or dropped."""
    if data.source != "folder" or not data.path:
        return []
    if not Path(data.path).is_dir():
        return [f"{cfg.where(f'{key}.path')}: {key}.path: dataset folder not found: {data.path}"]
    if data.class_map is None:
        return []
    summary = class_map_summary(data.class_map, folder_classes(Path(data.path)), f"{key}.class_map")
    return [f"{cfg.where(f'{key}.class_map')}: {key}.class_map: {summary}"] if summary else []


def folder_classes(root: Path) -> list[str]:
    """A folder dataset's class names: its sub-folders, as harness/data.py `scan_folder` reads them."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
