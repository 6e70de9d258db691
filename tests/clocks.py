"""Clocks for tests: time stands still until the test (or a sleep) moves it forward, or until
the test starts it."""

from __future__ import annotations

import time


class SteppedClock:
    """A :class:`evomerge.storage.clock.Clock` whose ``sleep`` returns at once and advances
    ``now`` by the time asked for; ``advance`` moves it as a test pleases."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.t = start
        self.slept = 0.0  # seconds of sleep asked for, in all

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.t += seconds

    def advance(self, seconds: float) -> None:
        self.t += seconds


class StartedClock:
    """A monotonic clock (seconds) that stands at 0 until :meth:`start`, then runs in real time:
    a deadline on it counts from a moment the test chooses (a worker hung), not from a start-up
    whose length depends on the machine's load."""

    def __init__(self) -> None:
        self.started_at: float | None = None  # time.monotonic() at the start

    def start(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()

    def __call__(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at
