"""Preflight: every read-only check before the night. The Optuna storage and the MLflow tracking
store (each problem stops the sweep with exit 2 and the store named, before the sweep creates
anything: no optuna.db, sweep.lock or run), the devices, and every image file of a folder, decoded
by training's decoder, with all of a folder's problems in one error."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import optuna
import pytest
from PIL import Image

from harness.config import ConfigError, DataConfig, SweepRefused, parse_config
from harness.data import DataError
from harness.preflight import check_mixed_precision, check_storage, check_tracking_store, checked_dataset
from tests.conftest import DATA, TINY, run_cli, run_main, write_config


@pytest.fixture(autouse=True)
def _results_outside_the_repository(tmp_path_factory, monkeypatch):
    """A folder that passes its image check is remembered under results/ (data.checked_images_dir):
    run from a folder of its own, never the repository and never a dataset root under test."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def refusal(check, *args) -> str:
    with pytest.raises(SweepRefused) as info:
        check(*args)
    return str(info.value)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A real, current MLflow SQLite store (MLflow creates and migrates it)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


# --- the Optuna storage and the MLflow store --------------------------------------------------------


def test_the_cli_refuses_a_corrupt_mlflow_db_before_creating_anything(workdir):
    config = write_config(workdir)
    (workdir / "results").mkdir()
    (workdir / "results" / "mlflow.db").write_bytes(b"not a database, whatever it once was " * 200)
    before = files_under(workdir)
    proc = run_cli(str(config), cwd=workdir, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"MLflow tracking store sqlite:///{workdir / 'results' / 'mlflow.db'}: " in proc.stderr
    assert "is not a readable SQLite database (file is not a database)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert files_under(workdir) == before  # no results/tiny/, optuna.db or sweep.lock


def test_the_cli_refuses_a_study_of_the_other_direction_before_creating_anything(workdir):
    config = write_config(workdir)
    storage = f"sqlite:///{workdir / 'results' / 'tiny' / 'optuna.db'}"
    (workdir / "results" / "tiny").mkdir(parents=True)
    optuna.create_study(study_name="tiny", storage=storage, direction="minimize")
    before = files_under(workdir)
    proc = run_cli(str(config), cwd=workdir, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"Optuna storage {storage}: study 'tiny' exists with direction minimize, but the config says maximize" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert files_under(workdir) == before  # no sweep.lock, no mlflow.db, no parent run
    assert len(optuna.load_study(study_name="tiny", storage=storage).trials) == 0


def test_a_store_that_does_not_exist_yet_passes_and_is_not_created(tmp_path):
    check_storage(f"sqlite:///{tmp_path / 'new' / 'optuna.db'}", "s", "maximize")
    check_tracking_store(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert files_under(tmp_path) == []


def test_an_existing_study_of_the_same_direction_passes_read_only(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=url, direction="maximize")
    db = tmp_path / "optuna.db"
    # Every write SQLite commits changes the file's header (its change counter), and a write
    # transaction leaves a journal beside it: the same bytes, time and files prove none happened.
    before = (hashlib.sha256(db.read_bytes()).hexdigest(), db.stat().st_mtime_ns, files_under(tmp_path))
    check_storage(url, "s", "maximize")
    check_storage(url, "another", "minimize")
    assert (hashlib.sha256(db.read_bytes()).hexdigest(), db.stat().st_mtime_ns, files_under(tmp_path)) == before


def test_a_damaged_database_is_named_whichever_store_it_is(tmp_path, mlflow_store):
    data = mlflow_store.read_bytes()
    (tmp_path / "truncated.db").write_bytes(data[: len(data) // 2])
    url = f"sqlite:///{tmp_path / 'truncated.db'}"
    assert "database disk image is malformed" in refusal(check_tracking_store, url)
    assert refusal(check_storage, url, "s", "maximize").startswith(f"Optuna storage {url}: ")


def test_each_store_refuses_the_others_database(tmp_path, mlflow_store):
    optuna_url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=optuna_url)
    message = refusal(check_tracking_store, optuna_url)
    assert message.startswith(f"MLflow tracking store {optuna_url}: its schema (alembic revision v")
    assert "another application's database (an Optuna storage?)" in message
    message = refusal(check_storage, f"sqlite:///{mlflow_store}", "s", "maximize")
    assert "holds another application's tables (" in message and "not Optuna's" in message
    assert (tmp_path / "optuna.db").stat().st_size and mlflow_store.stat().st_size  # both untouched, still there


def test_an_mlflow_store_at_an_old_schema_is_refused_with_the_upgrade_command(tmp_path, mlflow_store):
    old = tmp_path / "old.db"
    shutil.copy(mlflow_store, old)
    with sqlite3.connect(old) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0c779009ac13'")  # one of MLflow's older revisions
    message = refusal(check_tracking_store, f"sqlite:///{old}")
    assert "its schema (revision 0c779009ac13) is older than MLflow" in message
    assert f"then run: mlflow db upgrade sqlite:///{old}" in message


def test_an_optuna_storage_at_an_old_schema_is_refused_in_optunas_words(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=url)
    with sqlite3.connect(tmp_path / "optuna.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'v3.0.0.a'")
    assert "optuna storage upgrade" in refusal(check_storage, url, "s", "maximize")


def test_unreachable_servers_are_named_without_their_password(tmp_path):
    message = refusal(check_storage, "postgresql://sweeper:s3cret-pw@127.0.0.1:1/db", "s", "maximize")
    assert message.startswith("Optuna storage postgresql://sweeper:***@127.0.0.1:1/db: cannot reach or open it")
    message = refusal(check_tracking_store, "http://sweeper:s3cret-pw@127.0.0.1:1")
    assert message.startswith("MLflow tracking store http://sweeper:***@127.0.0.1:1: no answer")
    assert "s3cret-pw" not in message


# --- devices ----------------------------------------------------------------------------------------


def test_mixed_precision_on_is_refused_without_a_capable_gpu(monkeypatch):
    cfg = parse_config(f"{DATA}train: {{mixed_precision: on}}\n", "sweep.yaml")
    import harness.frameworks as frameworks

    monkeypatch.setattr(frameworks, "_TRIAL_GPUS", [])  # the sweep process's GPUs before hiding: none
    with pytest.raises(
        ConfigError,
        match=r"sweep.yaml: train\.mixed_precision: on needs a GPU of compute "
        r"capability >= 7\.0; GPUs visible: none \(CPU only\)",
    ):
        check_mixed_precision(cfg)
    monkeypatch.setattr(frameworks, "_TRIAL_GPUS", [("0", (6, 1))])
    with pytest.raises(ConfigError, match=r"GPUs visible: 6\.1\. Use auto"):
        check_mixed_precision(cfg)
    monkeypatch.setattr(frameworks, "_TRIAL_GPUS", [("0", (6, 1)), ("1", (8, 0))])
    check_mixed_precision(cfg)  # a capable GPU: accepted


@pytest.mark.parametrize("setting", ["auto", "off"])
def test_auto_and_off_pass_the_preflight_on_cpu(monkeypatch, setting):
    import harness.frameworks as frameworks

    monkeypatch.setattr(frameworks, "_TRIAL_GPUS", [])
    check_mixed_precision(parse_config(f"{DATA}train: {{mixed_precision: {setting}, jit_compile: on}}\n"))


# --- data and images --------------------------------------------------------------------------------


def _write_folder(root, classes=("cat", "dog"), n=6):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((20, 24, 3), 40 * i % 256, np.uint8)).save(root / c / f"{i}.png")


def test_corrupt_images_are_listed_before_anything_runs(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "dog" / "text.jpg").write_text("hello")
    with pytest.raises(DataError) as info:
        checked_dataset(DataConfig(source="folder", path=str(tmp_path)), "keras")
    assert "2 unreadable or corrupt" in str(info.value)
    assert "broken.png" in str(info.value) and "text.jpg" in str(info.value)


def _bad_folder(root):
    """An empty class, two unreadable files (one garbage, one 0 bytes) and a class of one image."""
    _write_folder(root)
    (root / "empty_one").mkdir()
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "dog" / "zero.jpg").write_bytes(b"")
    _write_folder(root, classes=("lonely",), n=1)


def test_every_problem_of_a_folder_is_reported_in_one_error(tmp_path):
    _bad_folder(tmp_path)
    with pytest.raises(DataError) as info:
        checked_dataset(DataConfig(source="folder", path=str(tmp_path)), "keras")
    text = str(info.value)
    assert text.startswith("data.path:") and "3 problem(s)" in text
    assert "empty_one holds no images (looked for .jpg, .jpeg, .png" in text
    assert "2 unreadable or corrupt image file(s)" in text and "broken.png" in text and "zero.jpg" in text
    assert "lonely has 1 usable image(s), too few to split" in text and "a class needs at least 3" in text


def test_without_the_decode_check_only_empty_files_are_unreadable(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "dog" / "zero.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="1 unreadable") as info:
        checked_dataset(DataConfig(source="folder", path=str(tmp_path)), "keras", decode=False)
    assert "zero.jpg" in str(info.value) and "broken.png" not in str(info.value)


def test_a_long_list_of_bad_files_is_capped_but_counted(tmp_path):
    _write_folder(tmp_path)
    for i in range(25):
        (tmp_path / "cat" / f"bad{i:02d}.jpg").write_text("x")
    with pytest.raises(DataError) as info:
        checked_dataset(DataConfig(source="folder", path=str(tmp_path)), "keras")
    text = str(info.value)
    assert "25 unreadable" in text and "... and 5 more" in text
    assert sum(f"bad{i:02d}.jpg" in text for i in range(25)) == 20


def test_a_format_training_cannot_decode_is_refused_even_when_pil_opens_it(tmp_path):
    """A TIFF or ICO saved with a .png name: PIL reads it, TensorFlow's decode_image (training's) does not."""
    _write_folder(tmp_path)
    pixels = np.full((20, 24, 3), 90, np.uint8)
    Image.fromarray(pixels).save(tmp_path / "cat" / "scan.png", format="TIFF")
    Image.fromarray(pixels).save(tmp_path / "dog" / "icon.png", format="ICO")
    with Image.open(tmp_path / "cat" / "scan.png") as im:
        assert im.format == "TIFF"  # the old PIL check passed this file
    with pytest.raises(DataError) as info:
        checked_dataset(DataConfig(source="folder", path=str(tmp_path)), "keras")
    text = str(info.value)
    assert "2 unreadable or corrupt image file(s): training's decoder (tf.io.decode_image: JPEG, PNG" in text
    assert f"{tmp_path / 'cat' / 'scan.png'} (a TIFF file)" in text
    assert f"{tmp_path / 'dog' / 'icon.png'} (an ICO file)" in text
    assert not Path("results").exists()  # a refused folder is not remembered


def test_a_resume_decodes_only_files_that_changed_since_they_passed(tmp_path):
    images, checks = tmp_path / "images", tmp_path / "checks"
    _write_folder(images)
    cfg = DataConfig(source="folder", path=str(images), checked_images_dir=str(checks))
    checked_dataset(cfg, "keras")
    (record,) = checks.glob("*.json")
    assert len(json.loads(record.read_text())["files"]) == 12 and not list(checks.glob(".*tmp"))

    # Same path, size and modification time: trusted, not decoded again (garbage of the same size passes).
    victim = images / "cat" / "3.png"
    stat = victim.stat()
    victim.write_bytes(b"\0" * stat.st_size)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert len(checked_dataset(cfg, "keras").paths) == 12

    # A new modification time: decoded again, and refused.
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(DataError, match="1 unreadable or corrupt") as info:
        checked_dataset(cfg, "keras")
    assert str(victim) in str(info.value)
    # A refused folder leaves the record as it was: the bad file is never remembered as good.
    saved = json.loads(record.read_text())["files"]
    assert saved[str(victim)] == [stat.st_size, stat.st_mtime_ns]


def test_without_a_checks_folder_every_file_is_decoded_every_time(tmp_path):
    _write_folder(tmp_path / "images")
    cfg = DataConfig(source="folder", path=str(tmp_path / "images"), checked_images_dir=None)
    checked_dataset(cfg, "keras")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_the_cli_reports_every_folder_problem_and_creates_nothing(workdir):
    _bad_folder(workdir / "images")
    config = write_config(
        workdir,
        TINY.replace("  source: builtin\n  name: shapes\n", f"  source: folder\n  path: {workdir / 'images'}\n").replace(
            "  classes: [pentagon, star4, three_dots]\n", ""
        ),
    )
    proc = run_main(str(config), cwd=workdir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    for problem in (
        "empty_one holds no images",
        "2 unreadable or corrupt",
        "broken.png",
        "zero.jpg",
        "lonely has 1 usable image(s)",
    ):
        assert problem in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (workdir / "results").exists() and not (workdir / "mlruns").exists()
