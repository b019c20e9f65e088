"""`python -m harness.predict MODEL FOLDER [--out predictions.csv]`: classify a folder of images.

MODEL is guessed in this order:
  - an existing `.keras` file; class names from the `MLmodel` next to its `data/` folder (MLflow's
    layout), else a `classes.json` (a JSON list) beside it, else `class_0..class_{k-1}`;
  - an MLflow run id (32 hex digits): the model logged in that run;
  - a registered model: `name` (its latest version), `name/3`, `name@alias` or a `models:/...` URI.
MLflow models carry their class names in the logged model's metadata (`class_names`).

Every image under FOLDER (recursively, sorted) is decoded exactly as training decoded it (the
model's framework's decoder): RGB, resized to the model's input size, uint8. Preprocessing is inside
the model. Writes one CSV row per readable image: `file` (relative to FOLDER), `predicted_class`,
`confidence`, then `p_<class>` per class. Unreadable files, and images of more pixels than
`--max-pixels` (read from the file's header, before anything is decoded), are named on stderr and
skipped.

Exit status: 0 at least one image predicted, 1 none readable, 2 bad MODEL, FOLDER or --out.

    >>> clf = resolve_model("demo@champion", None)
    >>> df, skipped = predict_folder(clf.model, clf.class_names, "photos/", batch_size=64)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from harness.data import IMAGE_EXTENSIONS
from harness.frameworks import framework_named
from harness.tracking import (
    TrackingError,
    global_tracking_uri,
    logged_model_metadata,
    plain_tracking_errors,
    run_model_uri,
)

if TYPE_CHECKING:
    from harness.frameworks.base import Predictor

RUN_ID = re.compile(r"[0-9a-f]{32}")
# Pillow's own decompression-bomb warning threshold (PIL.Image.MAX_IMAGE_PIXELS, 2**30 / 12): such an
# RGB image decodes to 268 MB, and resizing it to the model's input takes four times that in float32.
DEFAULT_MAX_PIXELS = 89_478_485


class PredictError(Exception):
    """MODEL or FOLDER cannot be used; the message is the one line the user sees (exit 2)."""


@dataclass
class Classifier:
    model: Predictor  # taking (batch, h, w, 3) pixels 0..255
    class_names: list[str] | None  # None: the source did not say
    image_size: int | None  # metadata image_size, the fallback when the model's input is unsized
    source: str  # what was loaded, for the log line


# ---------------------------------------------------------------------------------------- images


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under `folder`, recursively, sorted by relative path."""
    folder = Path(folder)
    if not folder.exists():
        raise PredictError(f"folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise PredictError(f"{str(folder)!r} is not a folder")
    files = sorted(
        (f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()),
        key=lambda f: f.relative_to(folder).as_posix(),
    )
    if not files:
        raise PredictError(f"folder {str(folder)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def input_size(model, fallback: int | None = None) -> tuple[int, int]:
    """(height, width) the model takes, from `model.input_shape`, else the logged image_size."""
    shape = model.input_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise PredictError(f"model takes {len(shape)} inputs; expected one image input")
        shape = shape[0]
    if len(shape) != 4 or shape[-1] != 3:
        raise PredictError(f"model input shape {shape} is not (batch, height, width, 3)")
    h, w = shape[1], shape[2]
    if h is None or w is None:
        if not fallback:
            raise PredictError("model input size is unknown (no fixed input shape, no image_size metadata)")
        h = h or fallback
        w = w or fallback
    return int(h), int(w)


def over_pixel_limit(path: Path, max_pixels: int) -> str | None:
    """Why the image at `path` is too large to decode, from its header alone; None when it is not.

    None too when Pillow cannot read the header: the decoder then names what is wrong with the file.
    Pillow itself refuses a header of more than 2 * Image.MAX_IMAGE_PIXELS (about 179 M) pixels, so
    a limit above that has no effect beyond it.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                width, height = image.size
        except Image.DecompressionBombError as exc:
            return str(exc)
        except Exception:  # noqa: BLE001 - not a header Pillow reads: left to the decoder
            return None
    if width * height > max_pixels:
        return f"{width}x{height} image, {width * height:,} pixels, is over the limit of {max_pixels:,} (--max-pixels)"
    return None


def _reason(exc: Exception) -> str:
    """One line: TensorFlow's own message without its op-location wrapping."""
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]", "", text).strip() or type(exc).__name__
    return text.splitlines()[0]


def predict_folder(
    model,
    class_names: list[str],
    folder: str | Path,
    batch_size: int = 64,
    image_size: int | None = None,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
):
    """Class probabilities for every image under `folder`.

    Returns (DataFrame, skipped): one row per readable image, columns `file` (POSIX path relative
    to `folder`), `predicted_class`, `confidence`, `p_<class>`; skipped is [(file, reason)] for
    files that could not be read or decoded, or that hold more than `max_pixels` pixels.
    `image_size` is used only when the model's input has no fixed size. Raises PredictError for a
    missing or empty folder or mismatched class names.
    """
    from tqdm import tqdm

    folder = Path(folder)
    files = list_images(folder)
    k = model.output_shape[-1]
    if k is not None and k != len(class_names):
        raise PredictError(f"model outputs {k} classes but {len(class_names)} class names were given")
    size = input_size(model, image_size)
    names: list[str] = []
    pixels: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    probs: list[np.ndarray] = []

    def flush():
        if pixels:
            out = np.asarray(model.predict(np.stack(pixels)), dtype=np.float64)
            probs.append(out.reshape(len(pixels), -1))
            pixels.clear()

    with tqdm(total=len(files), unit="img", file=sys.stderr, disable=not (progress and sys.stderr.isatty())) as bar:
        for path in files:
            rel = path.relative_to(folder).as_posix()
            too_large = over_pixel_limit(path, max_pixels)
            if too_large:
                skipped.append((rel, too_large))
            else:
                try:
                    pixels.append(model.decode(path.read_bytes(), size))  # as training decoded
                    names.append(rel)
                except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped and named
                    skipped.append((rel, _reason(exc)))
            if len(pixels) >= batch_size:
                flush()
            bar.update(1)
        flush()

    return _prediction_table(names, probs, class_names), skipped


def _prediction_table(names: list[str], probs: list[np.ndarray], class_names: list[str]) -> pd.DataFrame:
    """One row per image of `names`: `file`, `predicted_class`, `confidence`, then `p_<class>`,
    from the batches of class probabilities `probs`."""
    columns = [f"p_{c}" for c in class_names]
    p = np.concatenate(probs) if probs else np.zeros((0, len(class_names)))
    if p.shape[1] != len(class_names):
        raise PredictError(f"model outputs {p.shape[1]} classes but {len(class_names)} class names were given")
    best = p.argmax(axis=1) if len(p) else np.zeros(0, dtype=int)
    df = pd.DataFrame(
        {
            "file": names,
            "predicted_class": [class_names[i] for i in best],
            "confidence": p[np.arange(len(p)), best],
        }
    )
    return pd.concat([df, pd.DataFrame(p, columns=columns)], axis=1)


def out_problem(out: str) -> str | None:
    """Why the CSV cannot be written at `out` (a folder, or under a file), checked before any work; else None."""
    path = Path(out)
    if path.is_dir() or out.endswith(("/", os.sep)):
        return f"is a folder; give the CSV file to write, e.g. {(path / 'predictions.csv').as_posix()}"
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else f"{str(parent)!r} is a file, not a folder"
    return None


def write_csv_atomic(df: pd.DataFrame, out: str | Path) -> Path:
    """Write to a temporary file beside `out`, then rename: readers see the old file or the whole new one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            df.to_csv(fh, index=False)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; a CSV should be like any other file
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# ---------------------------------------------------------------------------------------- models


def _mlmodel_metadata(mlmodel: Path) -> dict:
    """The `metadata:` block of an MLflow MLmodel file ({} when unreadable)."""
    import yaml

    try:
        meta = (yaml.safe_load(mlmodel.read_text()) or {}).get("metadata")
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _class_names(value) -> list[str] | None:
    return [str(n) for n in value] if isinstance(value, list) else None


def load_keras_file(path: Path) -> Classifier:
    """A `.keras` file; class names from MLflow's MLmodel (`<model>/data/model.keras` layout) or classes.json."""
    try:
        model = framework_named("keras").load_model(str(path))
    except Exception as exc:  # noqa: BLE001 - any load failure means MODEL cannot be used
        raise PredictError(f"cannot load model file {str(path)!r}: {_reason(exc)}") from exc
    meta = {}
    mlmodel = path.resolve().parent.parent / "MLmodel"
    if mlmodel.is_file():
        meta = _mlmodel_metadata(mlmodel)
    names = _class_names(meta.get("class_names"))
    classes_json = path.parent / "classes.json"
    if names is None and classes_json.is_file():
        try:
            names = _class_names(json.loads(classes_json.read_text()))
        except (OSError, ValueError) as exc:
            raise PredictError(f"cannot read {str(classes_json)!r}: {_reason(exc)}") from exc
        if names is None:
            raise PredictError(f"{str(classes_json)!r} must hold a JSON list of class names")
    size = meta.get("image_size")
    return Classifier(model, names, int(size) if size else None, f"file {path}")


def _registered_uri(spec: str) -> str:
    if spec.startswith("models:/"):
        return spec
    if "@" in spec or re.fullmatch(r".+/\d+", spec):
        return f"models:/{spec}"  # name@alias, name/3
    return f"models:/{spec}/latest"


def load_mlflow_model(uri: str) -> Classifier:
    """A model from the tracking/registry store (the global tracking URI must be set), loaded by the
    framework it was trained with ("keras" for models logged before the metadata named it)."""
    meta = logged_model_metadata(uri)
    model = framework_named(str(meta.get("framework", "keras"))).load_model(uri)
    size = meta.get("image_size")
    return Classifier(model, _class_names(meta.get("class_names")), int(size) if size else None, uri)


def _sqlite_missing(uri: str) -> str | None:
    """The file of a sqlite:/// store that does not exist (MLflow would create an empty one), else None."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :].split("?")[0])
        if not path.exists():
            return str(path)
    return None


def resolve_model(spec: str, tracking_uri: str | None) -> Classifier:
    """Load MODEL: a `.keras` file, a run id, or a registered model. Raises PredictError naming what was tried."""
    if spec.endswith(".keras"):
        if Path(spec).is_file():
            return load_keras_file(Path(spec))
        raise PredictError(f"model {spec!r} not found: no such .keras file")
    from harness.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    missing = _sqlite_missing(uri)
    if missing:
        raise PredictError(f"model {spec!r} not found: not a .keras file, and there is no MLflow store at {missing}")

    is_run = RUN_ID.fullmatch(spec) is not None
    tried = []
    with global_tracking_uri(uri):
        if is_run:
            try:
                with plain_tracking_errors():
                    return load_mlflow_model(run_model_uri(uri, spec))
            except (TrackingError, OSError) as exc:
                tried.append(f"run id ({_reason(exc)})")
        model_uri = _registered_uri(spec)
        try:
            with plain_tracking_errors():
                return load_mlflow_model(model_uri)
        except (TrackingError, OSError) as exc:
            tried.append(f"registered model {model_uri} ({_reason(exc)})")
    raise PredictError(f"model {spec!r} not found at {uri}: tried " + "; ".join(tried))


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", metavar="MODEL", help="registered model name[/version], models:/ URI, run id, or .keras file")
    parser.add_argument("folder", metavar="FOLDER", help="folder of images (searched recursively)")
    parser.add_argument("--out", default="predictions.csv", help="output CSV (default: predictions.csv)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, results/mlflow.db)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"skip images with more pixels than this, read from their header (default {DEFAULT_MAX_PIXELS:,})",
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.max_pixels < 1:
        parser.error("--max-pixels must be at least 1")
    problem = out_problem(args.out)
    if problem:  # before the model is loaded and the images are read
        print(f"error: --out {args.out!r}: {problem}", file=sys.stderr)
        return 2

    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        list_images(args.folder)  # fail on a bad folder before the (slow) model load
        clf = resolve_model(args.model, args.tracking_uri)
        names = clf.class_names
        if names is None:
            k = int(clf.model.output_shape[-1])
            names = [f"class_{i}" for i in range(k)]
            print(f"warning: {clf.source} carries no class names; using class_0..class_{k - 1}", file=sys.stderr)
        df, skipped = predict_folder(
            clf.model, names, args.folder, args.batch_size, clf.image_size, progress=True, max_pixels=args.max_pixels
        )
    except PredictError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    for rel, reason in skipped:
        print(f"skipped {Path(args.folder) / rel}: {reason}", file=sys.stderr)
    if df.empty:
        print(f"error: none of the {len(skipped)} images could be read; nothing written", file=sys.stderr)
        return 1
    out = write_csv_atomic(df, args.out)
    print(f"predicted {len(df)} images, skipped {len(skipped)}, with {clf.source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
