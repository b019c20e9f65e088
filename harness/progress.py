"""A one-line progress display for long sweeps: trials done/left, current phase and epoch, best.

On a terminal the line is redrawn in place; in a log file (nohup, CI) each update is its own line,
throttled to phase changes and epoch ends, so an overnight log stays readable.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, n_trials: int, already_done: int, direction: str, metric: str, stream=None, prefix: str = "",
                 best: float | None = None, started: float | None = None):
        """`started`: a time.monotonic() reading, so a trial process shows the sweep's elapsed time."""
        self.n_trials, self.done = n_trials, already_done
        self.direction, self.metric = direction, metric
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.best = best
        self.trial: int | None = None
        self.phase = ""
        self.started = time.monotonic() if started is None else started
        self.prefix = f"{prefix} " if prefix else ""

    def _emit(self, text: str, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _head(self) -> str:
        best = "-" if self.best is None else f"{self.best:.4f}"
        elapsed = time.monotonic() - self.started
        return f"{self.prefix}[{self.done}/{self.n_trials} done, {max(0, self.n_trials - self.done)} left, best {self.metric} {best}, {elapsed:.0f}s]"

    def trial_started(self, number: int, params: dict) -> None:
        self.trial = number
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        self._emit(f"{self._head()} trial {number} starts: {shown}", final=True)

    def phase_started(self, phase: str) -> None:
        self.phase = phase

    def epoch_done(self, epoch: dict) -> None:
        """`epoch`: number, epoch, phase, metrics, total_epochs (as a trial process reports it)."""
        m = epoch["metrics"]
        self._emit(
            f"{self._head()} trial {epoch['number']} {epoch['phase']} epoch {epoch['epoch'] + 1}/{epoch['total_epochs']}"
            f" loss {m.get('loss', float('nan')):.3f} val_acc {m.get('val_accuracy', float('nan')):.3f}"
        )

    def trial_finished(self, number: int, state: str, value: float | None, best: float | None, counted: bool,
                       reason: str | None = None) -> None:
        if counted:
            self.done += 1
        self.best = best
        shown = "" if value is None else f" {self.metric}={value:.4f}"
        if state == "FAIL" and reason:
            shown += f" ({reason[:200]})"
        self._emit(f"{self._head()} trial {number} {state}{shown}", final=True)

    def message(self, text: str) -> None:
        self._emit(text, final=True)
