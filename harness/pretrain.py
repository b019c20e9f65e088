"""The harness's own source backbone: pretrained on a source dataset, cached, re-used.

Offline there are no ImageNet weights, yet a demo must still *transfer*. So the harness trains the
backbone itself on a large, varied source set (config `source:`) and saves the headless backbone's
weights. Lookup order for a config's source weights:

1. harness/assets/<backbone>-<key>.weights.h5  (shipped with the package, made by `--ship`);
2. <source.cache_dir>/<backbone>-<key>.weights.h5  (made on first use);
3. otherwise pretrain now and write (2).

The key hashes everything that shapes the weights (backbone, its options, input size, the whole
source block), so changing any of it pretrains anew instead of silently re-using stale weights.
Training is seeded with op determinism on, so running the command again reproduces the file.

    python -m harness.pretrain sweeps/demo.yaml          # fill the cache
    python -m harness.pretrain sweeps/demo.yaml --ship   # (re)make the shipped asset
    python -m harness.pretrain sweeps/quadrants-demo.yaml --ship --backbone MobileNetV3Small
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

from harness.config import ConfigError, SourceConfig, SweepConfig, backbone_candidates, load_config

ASSETS = Path(__file__).parent / "assets"
PRETRAIN_SEED = 1234
# Data keys that say where images are cached or stored, never which images: not part of the key.
NOT_WEIGHTS = ("memory_cache_mib", "disk_cache_dir", "disk_cache_max_gib", "tfds_dir", "checked_images_dir")
LATE_DEFAULTS = {"class_map": None, "official_splits": True}


def _source(cfg: SweepConfig) -> SourceConfig:
    """The config's source block: everything here serves a sweep that has one (model.weights: source)."""
    assert cfg.source is not None, "the config has no source: block"
    return cfg.source


def source_key(cfg: SweepConfig, backbone: str) -> str:
    source = dataclasses.asdict(_source(cfg))  # includes the input size the weights were trained at
    source.pop("cache_dir")
    blob = {"backbone": backbone, "options": cfg.model.backbone_options.get(backbone, {}), "source": source}
    data = source["data"]
    for key in NOT_WEIGHTS:
        data.pop(key, None)
    # Data keys added after weights were shipped change nothing at their defaults: leaving them out
    # of the key keeps finding the shipped file (and every cached one).
    for key, default in LATE_DEFAULTS.items():
        if data.get(key, default) == default:
            data.pop(key, None)
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:10]


def weights_filename(cfg: SweepConfig, backbone: str) -> str:
    return f"{backbone}-{source_key(cfg, backbone)}.weights.h5"


def find_source_weights(cfg: SweepConfig, backbone: str) -> Path | None:
    name = weights_filename(cfg, backbone)
    for folder in (ASSETS, Path(_source(cfg).cache_dir)):
        if (folder / name).is_file():
            return folder / name
    return None


def ensure_source_weights(cfg: SweepConfig, backbone: str, log=print) -> Path:
    found = find_source_weights(cfg, backbone)
    if found:
        return found
    src = _source(cfg)
    out = Path(src.cache_dir) / weights_filename(cfg, backbone)
    log(f"pretraining the source backbone {backbone} on {src.data.name} (once; cached at {out})")
    pretrain(cfg, backbone, out, log=log)
    return out


def pretrain(cfg: SweepConfig, backbone: str, out: Path, log=print) -> dict:
    """Train backbone + linear head on the source set; save the backbone's weights and a report."""
    from harness.data import make_splits
    from harness.frameworks import framework_for
    from harness.frameworks.base import ModelSpec, PhaseData, PhaseRun
    from harness.phases import scratch_plan
    from harness.preflight import checked_dataset

    fw = framework_for(backbone)
    # Whatever ran before in this process (another backbone's pretraining, a sweep building its
    # candidates) leaves Keras' layer names and seed state behind, and a second pretraining in one
    # process gave other weights than the same one alone: start from a clean state, always.
    fw.make_reproducible(PRETRAIN_SEED)
    src = _source(cfg)
    data = checked_dataset(src.data, fw.name)  # every image checked, as a sweep's own data is
    splits = make_splits(data.labels, src.data, data.official)
    spec = ModelSpec(
        backbone=backbone,
        image_size=src.data.image_size,
        num_classes=data.num_classes,
        weights=None,
        backbone_options=dict(cfg.model.backbone_options.get(backbone, {})),
    )
    model = fw.build(spec, seed=PRETRAIN_SEED)
    train = fw.image_batches(data, splits.train, src.batch_size, shuffle=True, seed=PRETRAIN_SEED)
    val = fw.image_batches(data, splits.val, src.batch_size, shuffle=False)
    started = time.perf_counter()
    epochs = []

    def on_epoch(r):
        epochs.append(r)
        log(
            f"  source epoch {r.epoch + 1}/{src.epochs}: loss {r.metrics['loss']:.3f} "
            f"val_accuracy {r.metrics.get('val_accuracy', float('nan')):.3f}"
        )

    # The source keeps its last epoch, as the shipped weights were made: `--ship` must reproduce them.
    (phase,) = scratch_plan(src.epochs, src.learning_rate, None)
    fw.set_trainable(model, phase.unfreeze_blocks)
    fw.run_phase(model, phase, PhaseData(train, val), PhaseRun(0, on_epoch))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name.replace(".weights.h5", ".partial.weights.h5"))
    fw.save_backbone_weights(model, str(tmp))
    tmp.replace(out)  # atomic: a crash never leaves a half-written cache entry behind
    report = {
        "backbone": backbone,
        "source": src.data.name,
        "classes": data.num_classes,
        "train_images": int(len(splits.train)),
        "epochs": src.epochs,
        "final_val_accuracy": epochs[-1].metrics.get("val_accuracy"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.with_suffix("").with_suffix(".json").write_text(json.dumps(report, indent=2))
    log(f"source backbone saved: {out} (val_accuracy {report['final_val_accuracy']:.3f}, {report['seconds']}s)")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="sweeps/demo.yaml", help="sweep config with a source: block")
    parser.add_argument("--ship", action="store_true", help="write into harness/assets/ (the shipped copy)")
    parser.add_argument(
        "--backbone",
        action="append",
        metavar="NAME",
        help="pretrain only this backbone of the config's search (repeatable; default: all of them)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        if cfg.source is None:
            raise ConfigError(f"{args.config}: source: no source block to pretrain from")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    backbones = backbone_candidates(cfg.search)
    unknown = sorted(set(args.backbone or ()) - set(backbones))
    if unknown:
        print(
            f"error: --backbone {', '.join(unknown)}: not among {args.config}'s search.backbone {list(backbones)}",
            file=sys.stderr,
        )
        return 2
    for backbone in args.backbone or backbones:
        folder = ASSETS if args.ship else Path(cfg.source.cache_dir)
        pretrain(cfg, backbone, folder / weights_filename(cfg, backbone))
    return 0


if __name__ == "__main__":
    sys.exit(main())
