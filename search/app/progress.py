"""What a running search shows: its phase (start-up, search, held-out re-scoring, replay) with
the time spent in it, and during the search trials done / budget, rate, ETA, best fitness and
busy workers.

On a terminal: a live display (rich) that keeps the elapsed time ticking through the silent
phases (Ray start-up). Otherwise (a log file, a pipe): a timestamped line at each phase, one
every ``every_s`` seconds during the search, and a final line.

The ETA is measured from the first results of this run, never from before the workers were
up: start-up (Ray, model loading) is not part of the rate.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from evomerge.search.observers import LoopState, QuietObserver


class Progress(QuietObserver):
    """Phases (entered by the commands) and the search's progress (an observer of
    :class:`search.controller.Controller`)."""

    def __init__(self, total: int, done: int = 0, stream: TextIO | None = None, every_s: float = 15.0,
                 terminal: bool | None = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.total, self.start_done, self.done = total, done, done
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.every_s, self.clock, self.wall = every_s, clock, wall
        self.started = self.phase_started = clock()
        self.phase_name = ""
        self.best: float | None = None
        self._searched = False
        self.busy = self.workers = 0
        self._anchor: tuple[float, int] | None = None  # (time, done) at the first results
        self._last_line = -math.inf
        self._live = _Live(self.stream, clock) if self.terminal else None

    # --- what callers report -------------------------------------------------------

    def phase(self, name: str) -> None:
        """Enter a phase (``start-up: Ray and workers``, ``held-out re-scoring``, ...)."""
        self.phase_name, self.phase_started = name, self.clock()
        if self._live:
            self._live.phase(name)
        else:
            self._line(f"{name} ...")

    def searching(self, state: LoopState) -> None:
        """The controller's loop state (search/observers.py)."""
        self.update(state.done, state.best, state.busy, state.workers)

    def update(self, done: int, best: float | None, busy: int, workers: int, force: bool = False) -> None:
        """The search's state; the first call means the workers are up (phase ``search``)."""
        if self.phase_name != "search":
            self.phase("search")
        self._searched = True
        now = self.clock()
        if self._anchor is None and done > self.start_done:
            self._anchor = (now, done)
        self.done, self.best, self.busy, self.workers = done, best, busy, workers
        if self._live:
            self._live.search(done, self.total, self._rates())
        elif force or now - self._last_line >= self.every_s:
            self._last_line = now
            self._line(self.status())

    def close(self, final: str | None = None) -> None:
        """End the display; the last state and ``final`` are always written."""
        if self._live:
            self._live.stop()
        line = self.status() if self._searched else ""
        text = "; ".join(p for p in (line, final) if p)
        if text:
            self._line(f"{text} (total {_duration(self.clock() - self.started)})")

    # --- what is shown --------------------------------------------------------------

    def rate(self) -> float | None:
        """Trials per second since the first results of this run; None until a round more
        (at least two, and one per worker) came in: results that land together (workers
        started at once, duplicates settled at once) say nothing about the pace."""
        if self._anchor is None or self.done - self._anchor[1] < max(2, self.workers):
            return None
        return (self.done - self._anchor[1]) / max(self.clock() - self._anchor[0], 1e-9)

    def eta_s(self) -> float | None:
        rate = self.rate()
        return None if rate is None else max(self.total - self.done, 0) / rate

    def status(self) -> str:
        """The search's state in one line."""
        return (f"{self.done}/{self.total} trials | elapsed {_duration(self.clock() - self.started)} | "
                f"{self._rates()}")

    def _rates(self) -> str:
        rate, eta = self.rate(), self.eta_s()
        best = "-" if self.best is None else f"{self.best:.4f}"
        return (f"{'-' if rate is None else f'{rate * 60:.1f}'}/min | ETA {'-' if eta is None else _duration(eta)} | "
                f"best {best} | busy {self.busy}/{self.workers}")

    def _line(self, text: str) -> None:
        if self._live:
            self._live.print(text)
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.wall()))
        self.stream.write(f"{stamp} {text}\n")
        self.stream.flush()


@contextmanager
def phase(name: str, stream: TextIO | None = None) -> Iterator[None]:
    """A phase outside a search (replay): shown while it runs, its time when it ends."""
    progress = Progress(0, stream=stream)
    progress.phase(name)
    ok = False
    try:
        yield
        ok = True
    finally:
        progress.close(f"{name}: {'done' if ok else 'stopped'}")


class _Live:
    """The terminal display: one rich task per phase, elapsed time refreshed by rich's thread."""

    def __init__(self, stream: TextIO, clock: Callable[[], float]) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

        # phase, bar, done/total, time in the phase, then rate, ETA, best and busy workers
        self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                console=Console(file=stream, force_terminal=True), get_time=clock,
                                refresh_per_second=2)
        self.task: int | None = None
        self.bar.start()

    def phase(self, name: str) -> None:
        self._finish()
        self.task = self.bar.add_task(name, total=None, info="")

    def search(self, done: int, total: int, info: str) -> None:
        assert self.task is not None
        self.bar.update(self.task, total=total, completed=min(done, total), info=info)

    def print(self, text: str) -> None:
        self.bar.console.print(text, highlight=False)

    def _finish(self) -> None:
        if self.task is not None:
            if self.bar.tasks[self.task].total is None:  # a phase without a count: shown as done
                self.bar.update(self.task, total=1, completed=1)
            self.bar.stop_task(self.task)

    def stop(self) -> None:
        self._finish()
        self.bar.stop()


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "-"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
