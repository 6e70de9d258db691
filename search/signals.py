"""Orderly stops on SIGINT (Ctrl-C) and SIGTERM (what batch schedulers send).

Python raises KeyboardInterrupt wherever the main thread happens to be: inside a Ray call,
half-way through an SQL commit, or in the cleanup that runs after it, where it turns into
another exception and the process exits 1 with the study half-recorded. Ray's driver also
replaces the SIGTERM disposition (its C++ failure handler aborts: exit 134).

So: :func:`install` routes both signals here (call it again after ``ray.init``). Outside a
:func:`deferred` block a signal raises :class:`Stopped` at once, as KeyboardInterrupt would;
inside one it only records the request, which :func:`check` raises at the controller's
safe points, and which the block raises when it ends. The cleanup a stop triggers runs
inside the block, so a second signal cannot cut it short either.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """A stop asked for by a signal; a KeyboardInterrupt, so every handler of Ctrl-C sees it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


_requested: int | None = None
_installed = False
_depth = 0  # nesting of deferred() blocks


def _handler(signum: int, frame: FrameType | None) -> None:
    global _requested
    if _requested is None:
        _requested = signum
    if _depth == 0:
        raise Stopped(signum)


def install() -> None:
    """Route SIGINT and SIGTERM to this module (an entry point's call; main thread only)."""
    global _installed
    _installed = True
    for signum in HANDLED:
        signal.signal(signum, _handler)


def reinstall() -> None:
    """Take the signals back after a library replaced their handlers (``ray.init``), if
    :func:`install` was called: library code never installs handlers of its own accord."""
    if _installed:
        install()


def requested() -> int | None:
    """The signal that asked for a stop, if any."""
    return _requested


def check() -> None:
    """A safe point: raise :class:`Stopped` if a stop was asked for."""
    if _requested is not None:
        raise Stopped(_requested)


@contextmanager
def deferred() -> Iterator[None]:
    """Inside, signals only record a stop; it is raised at :func:`check` or when the block ends."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    check()  # reached only when the block ended normally


def reset() -> None:
    """Forget a recorded stop (for a process that runs another command after handling one)."""
    global _requested
    _requested = None
