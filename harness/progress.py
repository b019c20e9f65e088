"""Progress of a long sweep: trials done/left, current trial, phase and epoch, best value, ETA.

On a terminal it is one tqdm bar over trials that fits the terminal's width (redrawn on resize),
with elapsed time and ETA; trial starts and ends are printed above it as permanent lines. In a
log file (nohup, CI, a pipe) there is no bar and no carriage return: one plain line per trial
start, epoch end and trial end, so an overnight log stays readable.

    >>> progress = Progress(n_trials=20, already_done=3, direction="maximize", metric="val_accuracy")
    >>> progress.trial_started(3, {"head_lr": 0.003})
    >>> progress.epoch_done({"number": 3, "phase": "head", "epoch": 0, "total_epochs": 5, "metrics": {...}})
    >>> progress.trial_finished(3, "COMPLETE", 0.91, best=0.91, counted=True)
"""

from __future__ import annotations

import os
import sys
import textwrap
import time

from tqdm import tqdm


class _Bar(tqdm):
    monitor_interval = 0  # no tqdm monitor thread: this bar is redrawn by every epoch's update


class Progress:
    def __init__(
        self,
        n_trials: int,
        already_done: int,
        direction: str,
        metric: str,
        stream=None,
        prefix: str = "",
        best: float | None = None,
        started: float | None = None,
        ncols: int | None = None,
    ):
        """`started`: a time.monotonic() reading, so a trial process shows the sweep's elapsed time.
        `ncols`: the bar's width on a terminal; None follows the terminal (or $COLUMNS)."""
        self.n_trials, self.done = n_trials, already_done
        self.direction, self.metric = direction, metric
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.best = best
        self.trial: int | None = None
        self.phase = ""
        self.epoch = ""  # "2/5" of the current phase, on the bar
        self.started = time.monotonic() if started is None else started
        self.prefix = f"{prefix} " if prefix else ""
        self.ncols = ncols
        self.bar: _Bar | None = None  # made at the first update: a queued quadrant cell shows no bar yet

    # -- terminal ----------------------------------------------------------------------------

    def _bar(self) -> _Bar:
        if self.bar is None:
            self.bar = _Bar(
                total=self.n_trials,
                initial=self.done,
                file=self.stream,
                desc=self.prefix.strip() or None,
                unit="trial",
                ncols=self._columns(),
                leave=True,
                mininterval=0,
                miniters=1,  # updates come per epoch, seconds apart: draw each one
                # tqdm's default less the rate: the width goes to the bar and the postfix.
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
            )
            # Elapsed counts from `started` (a quadrant sweep's start); the ETA comes from the
            # smoothed time per trial of this bar, so the shift does not skew it.
            self.bar.start_t -= time.monotonic() - self.started
        return self.bar

    def _columns(self) -> int:
        """The width to draw in, measured again at every redraw so a resized terminal is followed
        (tqdm's own dynamic_ncols asks only the stream's file descriptor, and ignores $COLUMNS)."""
        if self.ncols:
            return self.ncols
        env = os.environ.get("COLUMNS", "")
        if env.isdigit() and int(env) > 0:
            columns = int(env)
        else:
            try:
                columns = os.get_terminal_size(self.stream.fileno()).columns
            except (AttributeError, OSError, ValueError):  # no descriptor (a wrapped stream) or no terminal
                columns = 80
        return max(20, columns - 1)  # not the last column: some terminals wrap as soon as it is written

    def _postfix(self) -> None:
        best = "-" if self.best is None else f"{self.best:.4f}"
        parts = [f"trial {self.trial}" if self.trial is not None else "", f"{self.phase} {self.epoch}".strip(), f"best {best}"]
        bar = self._bar()
        bar.ncols = self._columns()
        bar.set_postfix_str(", ".join(p for p in parts if p), refresh=False)
        bar.refresh()

    def _print_above(self, text: str) -> None:
        """A permanent line above the bar, wrapped to the terminal so no line overflows it."""
        bar = self._bar()
        bar.ncols = self._columns()
        for line in textwrap.wrap(text, width=bar.ncols, subsequent_indent="    ") or [""]:
            bar.write(line, file=self.stream)

    # -- log file ----------------------------------------------------------------------------

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _head(self) -> str:
        best = "-" if self.best is None else f"{self.best:.4f}"
        elapsed = time.monotonic() - self.started
        left = max(0, self.n_trials - self.done)
        return f"{self.prefix}[{self.done}/{self.n_trials} done, {left} left, best {self.metric} {best}, {elapsed:.0f}s]"

    # -- what the trial engine calls -----------------------------------------------------------

    def trial_started(self, number: int, params: dict) -> None:
        self.trial, self.phase, self.epoch = number, "", ""
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        if self.tty:
            self._print_above(f"{self.prefix}trial {number} starts: {shown}")
            self._postfix()
        else:
            self._line(f"{self._head()} trial {number} starts: {shown}")

    def epoch_done(self, epoch: dict) -> None:
        """`epoch`: number, epoch, phase, metrics, total_epochs (as a trial process reports it)."""
        m = epoch["metrics"]
        self.trial, self.phase = epoch["number"], epoch["phase"]
        self.epoch = f"{epoch['epoch'] + 1}/{epoch['total_epochs']}"
        if self.tty:
            self._postfix()
        else:
            self._line(
                f"{self._head()} trial {epoch['number']} {epoch['phase']} epoch {self.epoch}"
                f" loss {m.get('loss', float('nan')):.3f} val_acc {m.get('val_accuracy', float('nan')):.3f}"
            )

    def trial_finished(
        self, number: int, state: str, value: float | None, best: float | None, counted: bool, reason: str | None = None
    ) -> None:
        if counted:
            self.done += 1
        self.best = best
        shown = "" if value is None else f" {self.metric}={value:.4f}"
        if state == "FAIL" and reason:
            shown += f" ({reason[:200]})"
        if not self.tty:
            self._line(f"{self._head()} trial {number} {state}{shown}")
            return
        self._print_above(f"{self.prefix}trial {number} {state}{shown}")
        self.trial, self.phase, self.epoch = None, "", ""
        self._postfix()
        if counted:
            self._bar().update(1)
        if self.done >= self.n_trials:
            self.close()  # the study is full: leave the final bar as a line of its own

    def message(self, text: str) -> None:
        if self.tty and self.bar is not None:
            self._print_above(text)
        else:
            self._line(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
