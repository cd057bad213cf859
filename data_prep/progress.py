"""Progress of a long stage: a rich bar on a terminal, plain periodic lines everywhere else.

rich's own bar redraws in place, which a log file cannot show: with output redirected (Slurm, nohup, CI) it
prints once, at the very end. :class:`StageProgress` therefore picks by where the output goes:

- a terminal: a rich bar (count, rate, the stage's own fields, elapsed, ETA);
- anything else: one line every ``interval`` seconds (default 30, ``IPT_PROGRESS_SECONDS``) and one at the end::

    synthesize: 24/70 prompts (34%) | 0.41 prompts/s | 52.3 generated tokens/s | elapsed 58s | ETA 1m52s

The rate and ETA count only what was done in this process (work resumed from a journal is counted as done
but not as speed). Used by synthesis, tokenization, conversion, residuals and evaluation; the training loop
has its own iteration log lines (Megatron-LM's format).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

DEFAULT_INTERVAL_SECONDS = 30.0


def format_seconds(seconds: float) -> str:
    """``75`` -> ``'1m15s'``, ``3725`` -> ``'1h02m'``, ``9`` -> ``'9s'``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _interval() -> float:
    value = os.environ.get("IPT_PROGRESS_SECONDS")
    try:
        return float(value) if value else DEFAULT_INTERVAL_SECONDS
    except ValueError:
        raise ValueError(f"IPT_PROGRESS_SECONDS={value!r} is not a number of seconds") from None


class StageProgress:
    """Progress of ``total`` units of work (``unit``: 'prompts', 'documents', 'bytes', ...) in stage ``name``.

    ``rates``: extra per-second rates shown beside the unit rate, as ``{label: initial_count}``
    (e.g. ``{"generated tokens": 0}``); :meth:`advance` takes their increments as keywords with the label's
    spaces replaced by underscores. ``done``: units already finished before this process started (resume).
    ``enabled=False`` reports nothing. ``terminal`` overrides the terminal check (tests). ``quiet_when_quick``:
    no closing line (and no bar) when the work ended within one ``interval`` (a short step of a longer stage, e.g.
    tokenizing a small held-out set). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, name: str, total: int, unit: str, *, rates: dict[str, float] | None = None, done: int = 0,
                 enabled: bool = True, stream: TextIO | None = None, terminal: bool | None = None,
                 interval: float | None = None, byte_units: bool = False, quiet_when_quick: bool = False) -> None:
        self.name, self.total, self.unit, self.enabled = name, int(total), unit, enabled
        self.done, self.start_done = int(done), int(done)
        self.rates = dict(rates or {})
        self.stream = stream or sys.stdout
        self.byte_units = byte_units
        self.interval = _interval() if interval is None else interval
        self.started = time.monotonic()
        self.last_line = self.started
        self.last_printed: int | None = None  # ``done`` at the last plain line
        self.closed = False
        self.terminal = (terminal if terminal is not None else self.stream.isatty()) if enabled else False
        self.quiet_when_quick = quiet_when_quick
        self._bar = self._task = None
        if self.enabled and self.terminal and not quiet_when_quick:
            self._start_bar()

    # ------------------------------------------------------------------------------------------ public
    def advance(self, n: int = 1, **rate_increments: float) -> None:
        """``n`` more units done; ``rate_increments`` add to the named rates (``generated_tokens=123``)."""
        self.done += n
        for key, value in rate_increments.items():
            label = key.replace("_", " ")
            self.rates[label] = self.rates.get(label, 0) + value
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rates=self._rates_text())
        elif time.monotonic() - self.last_line >= self.interval:
            self._print_line()

    def line(self) -> str:
        """The current plain progress line."""
        elapsed = time.monotonic() - self.started
        count = f"{self._fmt(self.done)}/{self._fmt(self.total)}" + (f" {self.unit}" if self.unit else "")
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.name}: {count}{pct}"]
        fresh = self.done - self.start_done
        if elapsed > 0 and fresh > 0:
            parts.append(f"{self._fmt(fresh / elapsed)}{' ' + self.unit if self.unit else ''}/s")
        rates = self._rates_text()
        if rates:
            parts.append(rates)
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if 0 < fresh and self.done < self.total:
            parts.append(f"ETA {format_seconds((self.total - self.done) * elapsed / fresh)}")
        return " | ".join(parts)

    def close(self) -> None:
        """Stop the bar, or print the last line (once)."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled and self.last_printed != self.done:  # not the same line twice
            quick = self.last_printed is None and time.monotonic() - self.started < self.interval
            if not (self.quiet_when_quick and quick):
                self._print_line()

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- helpers
    def _fmt(self, value: float) -> str:
        if self.byte_units:
            for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
                if value >= size:
                    return f"{value / size:.2f} {unit}"
            return f"{value:.0f} B"
        return f"{value:,.0f}" if value >= 100 or float(value).is_integer() else f"{value:.2f}"

    def _rates_text(self) -> str:
        elapsed = time.monotonic() - self.started
        if elapsed <= 0:
            return ""
        return " | ".join(f"{value / elapsed:,.1f} {label}/s" for label, value in self.rates.items())

    def _print_line(self) -> None:
        self.last_line, self.last_printed = time.monotonic(), self.done
        print(self.line(), file=self.stream, flush=True)

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._bar = Progress(TextColumn(self.name), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
                             TextColumn("{task.fields[rates]}"), TimeElapsedColumn(), TextColumn("ETA"),
                             TimeRemainingColumn(), console=Console(file=self.stream))
        self._task = self._bar.add_task(self.name, total=self.total, completed=self.done, rates="")
        self._bar.start()


@contextmanager
def library_bars_when_terminal(stream: TextIO | None = None) -> Iterator[None]:
    """Let third-party progress bars draw only on a terminal: with ``stream`` (default stderr, where tqdm draws)
    redirected, transformers' bars ("Loading weights") and plain tqdm bars (the GGUF conversion's) are turned off
    inside the block, so a log file gets no carriage-return bar fragments on every model load."""
    stream = stream or sys.stderr
    if stream.isatty():
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    previous = os.environ.get("TQDM_DISABLE")
    hf_logging.disable_progress_bar()
    os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads its defaults from TQDM_* variables
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
