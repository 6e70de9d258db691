"""The time our storage reads and waits on, as a value passed in rather than a global.

Leases, heartbeats, row timestamps and the retry patience (storage/retry.py) read
:meth:`Clock.now` and wait with :meth:`Clock.sleep`. Production uses :class:`SystemClock`;
a test passes its own clock object and moves it forward, so a lease expires or a patience
runs out in no real time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    """Wall-clock seconds and a way to wait."""

    def now(self) -> float:
        """Seconds since the epoch: wall time, since leases are compared across processes
        and hosts."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a fake clock advances by them instead)."""
        ...


@dataclass(frozen=True)
class SystemClock:
    """The machine's clock: ``time.time`` and ``time.sleep``."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
