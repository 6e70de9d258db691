"""A clock for tests: time stands still until the test (or a sleep) moves it forward."""

from __future__ import annotations


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
