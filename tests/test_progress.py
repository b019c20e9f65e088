"""Progress: plain lines in a log file, one tqdm bar with an ETA that fits the terminal on a tty."""

from __future__ import annotations

import io
import re

import pytest

from harness.progress import Progress

PARAMS = {
    "backbone": "MobileNetV2",
    "head_lr": 0.0031234,
    "unfreeze_fraction": 0.55,
    "head_units": 8,
    "dropout": 0.1,
    "finetune_lr": 1e-4,
    "note": "a long value " * 4,
}


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def make():
    """Progress objects, closed after the test: tqdm stacks open bars, even on other streams."""
    made = []

    def make(*args, **kwargs) -> Progress:
        made.append(Progress(*args, **kwargs))
        return made[-1]

    yield make
    for progress in made:
        progress.close()


def _epoch(number: int, phase: str, epoch: int, total: int) -> dict:
    return {
        "number": number,
        "phase": phase,
        "epoch": epoch,
        "total_epochs": total,
        "metrics": {"loss": 0.5, "val_accuracy": 0.75},
    }


def _two_trials(progress: Progress) -> None:
    """Trial 1: head 2 epochs + finetune 1 epoch, COMPLETE; trial 2: 1 epoch, FAIL."""
    progress.trial_started(1, PARAMS)
    progress.epoch_done(_epoch(1, "head", 0, 2))
    progress.epoch_done(_epoch(1, "head", 1, 2))
    progress.epoch_done(_epoch(1, "finetune", 0, 1))
    progress.trial_finished(1, "COMPLETE", 0.8, best=0.8, counted=True)
    progress.trial_started(2, PARAMS)
    progress.epoch_done(_epoch(2, "head", 0, 2))
    progress.trial_finished(2, "FAIL", None, best=0.8, counted=True, reason="out of memory " * 30)


def _lines(text: str) -> list[str]:
    return re.split(r"[\r\n]", text)


def test_a_log_file_gets_one_plain_line_per_trial_start_epoch_and_end(make):
    out = io.StringIO()
    _two_trials(make(5, 1, "maximize", "val_accuracy", out))
    text = out.getvalue()
    assert "\r" not in text and "\033" not in text
    lines = text.splitlines()
    assert len(lines) == 2 + 4 + 2  # two starts, four epochs, two ends
    assert sum(" epoch " in line for line in lines) == 4
    assert "trial 1 head epoch 2/2 loss 0.500 val_acc 0.750" in lines[2]
    assert lines[4].startswith("[2/5 done, 3 left, best val_accuracy 0.8000,")
    assert "trial 2 FAIL (out of memory" in lines[-1] and lines[-1].startswith("[3/5 done, 2 left,")


def test_a_terminal_gets_a_bar_with_eta_and_postfix_that_fits_80_columns(monkeypatch, make):
    monkeypatch.setenv("COLUMNS", "80")
    out = FakeTty()
    progress = make(5, 1, "maximize", "val_accuracy", out, prefix="cell 1/4")
    _two_trials(progress)
    progress.epoch_done(_epoch(3, "head", 0, 4))  # a bar is drawn again after the last trial end
    text = out.getvalue()
    assert "\r" in text  # redrawn in place
    assert max(len(line) for line in _lines(text)) <= 80
    assert re.search(r"\| 3/5 \[\d\d:\d\d<\d\d:\d\d, trial 3, head 1/4, best 0\.8000\]", text)  # elapsed<ETA
    # Permanent lines above the bar: wrapped to the width, nothing lost.
    assert "trial 1 starts: backbone=MobileNetV2" in text and "trial 2 FAIL (out of memory" in text
    assert "epoch" not in text  # epochs only move the bar


@pytest.mark.parametrize("ncols", [40, 80, 120])
def test_an_explicit_width_is_respected(monkeypatch, make, ncols):
    monkeypatch.delenv("COLUMNS", raising=False)
    out = FakeTty()
    progress = make(3, 0, "maximize", "val_accuracy", out, ncols=ncols)
    _two_trials(progress)
    assert max(len(line) for line in _lines(out.getvalue())) <= ncols


def test_the_bar_closes_when_the_study_is_full_and_counts_resumed_trials(make):
    out = FakeTty()
    progress = make(3, 2, "minimize", "val_loss", out, ncols=80)
    progress.trial_started(7, {"head_lr": 0.01})
    assert "2/3" in out.getvalue()  # a resumed study starts at the trials already done
    progress.trial_finished(7, "COMPLETE", 0.3, best=0.3, counted=True)
    assert progress.bar is None and out.getvalue().endswith("\n")
    assert "3/3" in out.getvalue().rsplit("\r", 1)[-1]


def test_a_pruned_or_stale_trial_that_does_not_count_leaves_the_bar_where_it_was(make):
    out = FakeTty()
    progress = make(3, 0, "maximize", "val_accuracy", out, ncols=80)
    progress.trial_started(0, {})
    progress.trial_finished(0, "FAIL", None, best=None, counted=False)
    assert progress.done == 0 and progress.bar.n == 0
    progress.close()
    assert progress.bar is None


def test_a_quadrant_cell_shows_the_sweep_elapsed_time(make):
    import time

    out = FakeTty()
    progress = make(4, 0, "maximize", "val_accuracy", out, prefix="cell 2/4", started=time.monotonic() - 125, ncols=80)
    progress.trial_started(0, {})
    assert "[02:05<?" in out.getvalue()  # no ETA before a trial of this cell has finished
