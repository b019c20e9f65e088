"""Mixed precision and XLA on a GPU: what train.mixed_precision and train.jit_compile buy.

For each backbone it builds the harness's own transfer model (`harness.frameworks.keras.model.build_model`, from a
weights file, so the backbone is called as a pretrained one), then for each of the four settings
(mixed precision off/on x XLA off/on) trains phase 1 (backbone frozen) and phase 2 (the top half
of the blocks unfrozen) on random images, compiled by `harness.frameworks.keras.loop.compile_for`, as a trial
would. It reports images per second of each phase after a warm-up epoch (which holds the tracing
and compiling), and checks, per setting, what the switches must do:

  - the backbone's layers compute in float16 under mixed precision, float32 otherwise;
  - the softmax output stays float32;
  - the model is compiled with the jit_compile asked for;
  - training stays finite (the loss of every epoch).

It also reports what `auto` resolves to on this machine's GPUs (`harness.runtime.resolve_switch`).
It runs on whatever Keras backend is set: TensorFlow, which the harness needs, on a GPU box the
harness runs on; JAX (`KERAS_BACKEND=jax`) where only the model code can run. Under JAX, XLA off
means Keras runs the train step op by op, not through `jax.jit`.

    python benchmarks/gpu.py [--backbones ResNet50,MobileNetV2] [--batch 64] [--steps 12]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.compute import RESULTS, write_section  # noqa: E402
from benchmarks.engine import machine  # noqa: E402

SETTINGS = [(False, False), (False, True), (True, False), (True, True)]  # (mixed precision, XLA)


def gpu_capabilities_any_backend() -> list[tuple[int, int] | None]:
    """Compute capability of each GPU, as the backend in use reports it."""
    import keras

    if keras.backend.backend() == "tensorflow":
        from harness.runtime import gpu_capabilities

        return gpu_capabilities()
    if keras.backend.backend() == "jax":
        import jax

        caps = []
        for device in jax.devices():
            cc = getattr(device, "compute_capability", None)
            if device.platform == "gpu":
                caps.append(tuple(int(p) for p in str(cc).split(".")) if cc else None)
        return caps
    return []


def epoch_timer():
    """A Keras callback that keeps the seconds of each epoch of a fit (in `.seconds`)."""
    import keras

    starts: list[float] = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: starts.append(time.perf_counter()),
        on_epoch_end=lambda epoch, logs: timer.seconds.append(time.perf_counter() - starts[-1]),
    )
    timer.seconds = []
    return timer


def weights_file(backbone: str, image_size: int, folder: Path) -> str:
    """A weights file of randomly initialised backbone weights: ImageNet weights need internet,
    and a file makes `build_model` treat the backbone as pretrained (frozen BN, training=False)."""
    from harness.frameworks.keras import backbones as bb

    path = folder / f"{backbone}-{image_size}.weights.h5"
    if not path.exists():
        bb.construct(backbone, image_size, None, {}).save_weights(path)
    return str(path)


def measure(backbone: str, weights: str, mixed: bool, jit: bool, images: np.ndarray, labels: np.ndarray, args) -> dict:
    """One setting: phase 1 and phase 2 images/s, and the checks."""
    import keras

    from harness.frameworks.keras.loop import compile_for
    from harness.frameworks.keras.model import ModelSpec, build_model, set_backbone_trainable
    from harness.phases import blocks_to_unfreeze

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    spec = ModelSpec(backbone, args.image_size, 10, weights, {}, head_units=128, dropout=0.2)
    tm = build_model(spec, seed=0)
    steps = args.steps if jit else max(2, args.steps // 3)  # op by op is slow: fewer steps, same batch
    x, y = images[: args.batch * steps], labels[: args.batch * steps]
    convs = [layer for layer in tm.backbone.layers if isinstance(layer, keras.layers.Conv2D)]
    row = {
        "backbone": backbone,
        "mixed_precision": mixed,
        "jit_compile": jit,
        "batch": args.batch,
        "steps": steps,
        "conv_compute_dtype": convs[0].dtype_policy.compute_dtype,
        "output_dtype": str(tm.model.outputs[0].dtype),
    }
    for phase, unfrozen in (("phase1", 0), ("phase2", blocks_to_unfreeze(len(tm.blocks), 0.5))):
        set_backbone_trainable(tm, unfrozen)
        compile_for(tm, 1e-4, jit_compile=jit)
        times = epoch_timer()
        fitted = tm.model.fit(x, y, batch_size=args.batch, epochs=args.epochs, shuffle=False, verbose=0, callbacks=[times])
        timed = times.seconds[1:]  # the first epoch holds tracing and XLA compilation
        row[f"{phase}_first_epoch_s"] = round(times.seconds[0], 2)
        row[f"{phase}_images_per_s"] = round(len(x) / (sum(timed) / len(timed)), 1)
        row[f"{phase}_losses_finite"] = all(math.isfinite(v) for v in fitted.history["loss"])
        row[f"{phase}_compiled_jit"] = bool(getattr(tm.model, "jit_compile", jit))
    prediction = tm.model.predict(x[:8], verbose=0)
    row["prediction_dtype"] = str(prediction.dtype)
    return row


def checks_pass(row: dict) -> bool:
    want = "float16" if row["mixed_precision"] else "float32"
    return (
        row["conv_compute_dtype"] == want
        and "float32" in row["output_dtype"]
        and row["prediction_dtype"] == "float32"
        and all(row[f"{p}_losses_finite"] for p in ("phase1", "phase2"))
        and all(row[f"{p}_compiled_jit"] == row["jit_compile"] for p in ("phase1", "phase2"))
    )


def render(rows: list[dict], auto: dict, backend: str, seconds: float, args) -> str:
    on = {True: "on", False: "off"}
    lines = [
        "## Mixed precision and XLA on a GPU (train.mixed_precision, train.jit_compile)",
        "",
        f"`python benchmarks/gpu.py --backbones {args.backbones} --batch {args.batch} --steps {args.steps}`: the harness's "
        f"transfer model at {args.image_size} px (random weights from a file, so built as pretrained), phase 1 (backbone frozen) "
        "and phase 2 (top half of the blocks unfrozen), compiled by `compile_for` as a trial is. Images per second after a "
        f"warm-up epoch (the first epoch, which holds tracing and compiling, is shown apart). Keras backend: **{backend}**.",
        "",
        *(
            [
                "Under JAX, XLA off means Keras runs the train step op by op (no `jax.jit`), far slower than TensorFlow's graph "
                "mode without XLA: compare mixed precision on the XLA rows.",
                "",
            ]
            if backend == "jax"
            else []
        ),
        f"`auto` on this machine's GPUs (compute capability {auto['capabilities']}): "
        f"mixed precision {on[auto['mixed_precision']]}, XLA {on[auto['jit_compile']]}.",
        "",
        "| backbone | mixed precision | XLA | phase 1 img/s | phase 2 img/s | first epoch s (1 / 2) | conv computes in "
        "| output | checks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(
                f"| {row['backbone']} | {on[row['mixed_precision']]} | {on[row['jit_compile']]} "
                f"| failed: {row['error']} | | | | | |"
            )
            continue
        lines.append(
            f"| {row['backbone']} | {on[row['mixed_precision']]} | {on[row['jit_compile']]} "
            f"| {row['phase1_images_per_s']:,.0f} | {row['phase2_images_per_s']:,.0f} "
            f"| {row['phase1_first_epoch_s']} / {row['phase2_first_epoch_s']} | {row['conv_compute_dtype']} "
            f"| {row['prediction_dtype']} | {'pass' if checks_pass(row) else 'FAIL'} |"
        )
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        by = {(r["mixed_precision"], r["jit_compile"]): r for r in rows if r["backbone"] == backbone and "error" not in r}
        if (False, False) in by and (True, True) in by:
            base, fast = by[(False, False)], by[(True, True)]
            lines.append("")
            lines.append(
                f"- {backbone}: both switches on against both off: phase 1 "
                f"{fast['phase1_images_per_s'] / base['phase1_images_per_s']:.1f}x, phase 2 "
                f"{fast['phase2_images_per_s'] / base['phase2_images_per_s']:.1f}x."
            )
    lines += [
        "",
        f"Measured on {datetime.date.today().isoformat()} on {machine()}; Keras backend {backend}. "
        f"Section time: {seconds:.0f} s.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default="ResNet50,MobileNetV2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="steps per epoch with XLA (a third of them without)")
    parser.add_argument("--epochs", type=int, default=3, help="the first is the warm-up")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--json", type=Path, help="also write the rows here, after each setting")
    parser.add_argument("--budget", type=float, default=0, help="seconds after which settings not begun are skipped (0: none)")
    args = parser.parse_args()

    import keras

    from harness.runtime import resolve_switch

    started = time.perf_counter()
    capabilities = gpu_capabilities_any_backend()
    auto = {
        "capabilities": ", ".join("unknown" if c is None else f"{c[0]}.{c[1]}" for c in capabilities) or "none",
        "mixed_precision": resolve_switch("auto", capabilities),
        "jit_compile": resolve_switch("auto", capabilities),
    }
    print(f"backend {keras.backend.backend()}; GPUs' compute capability: {auto['capabilities']}", flush=True)
    rng = np.random.default_rng(0)  # one set of random images for every setting (the largest a setting uses)
    images = rng.uniform(0, 255, (args.batch * args.steps, args.image_size, args.image_size, 3)).astype("float32")
    labels = rng.integers(0, 10, len(images))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in [b.strip() for b in args.backbones.split(",") if b.strip()]:
            weights = weights_file(backbone, args.image_size, Path(tmp))
            for mixed, jit in SETTINGS:
                if args.budget and time.perf_counter() - started > args.budget:
                    print(
                        f"--budget {args.budget:.0f} s spent: {backbone} with mixed precision {mixed}, XLA {jit} skipped",
                        flush=True,
                    )
                    continue
                try:
                    row = measure(backbone, weights, mixed, jit, images, labels, args)
                except Exception as exc:  # one failed setting must not hide the others' numbers
                    row = {
                        "backbone": backbone,
                        "mixed_precision": mixed,
                        "jit_compile": jit,
                        "error": f"{type(exc).__name__}: {exc}"[:200],
                    }
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"auto": auto, "rows": rows}, indent=1))
    keras.mixed_precision.set_global_policy("float32")
    text = render(rows, auto, keras.backend.backend(), time.perf_counter() - started, args)
    write_section(args.out, "gpu", text)
    print(text)
    if not all("error" not in r and checks_pass(r) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
