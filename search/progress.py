"""A live progress line: trials done / budget, best fitness so far, ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Redraws one line on a terminal; prints a line every ``every_s`` seconds otherwise."""

    def __init__(self, total: int, done: int = 0, stream: TextIO | None = None, every_s: float = 15.0) -> None:
        self.total, self.start_done = total, done
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self.started = time.monotonic()
        self._last = 0.0

    def update(self, done: int, best: float | None, busy: int, workers: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.tty and not force and now - self._last < self.every_s:
            return
        self._last = now
        rate = (done - self.start_done) / max(now - self.started, 1e-9)
        # The first results include worker start-up: no ETA until a few have come in.
        eta = (self.total - done) / rate if done - self.start_done >= 4 else float("nan")
        width = 24
        filled = int(width * min(done / max(self.total, 1), 1.0))
        bar = "#" * filled + "." * (width - filled)
        best_s = f"{best:.4f}" if best is not None else "-"
        line = (f"[{bar}] {done}/{self.total} trials | best {best_s} | "
                f"busy {busy}/{workers} | ETA {_duration(eta)}")
        if self.tty:
            self.stream.write("\r" + line.ljust(90))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "--"
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
