"""Bounded retries of database work through transient faults, then one true line.

A long search outlives short database outages: a PostgreSQL restart (connections refused or
reset for a second or two), an outside SQLite writer holding the lock, a serialization
failure. Each database operation of ours is one short transaction, so a failed one is
simply run again, with backoff, for at most ``patience_s`` seconds (``$EVOMERGE_DB_PATIENCE_S``,
default 120); past that, :class:`DatabaseUnavailable` says what is wrong in one line.
Anything else (bad data, a missing table) is not transient and is raised at once.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import exc as sa_exc

from evomerge.storage.clock import Clock, SystemClock
from evomerge.storage.engine import patience_s, redacted

__all__ = ["DatabaseUnavailable", "patience_s", "retrying", "transient"]
T = TypeVar("T")
_log = logging.getLogger(__name__)


class DatabaseUnavailable(RuntimeError):
    """The database stayed unreachable or locked past the patience; one line for the user."""


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def transient(exc: BaseException) -> tuple[str, str] | None:
    """``(kind, cause)`` for a fault worth retrying (kind: locked | unreachable | conflict),
    else None. Walks the cause chain: Optuna wraps driver errors in StorageInternalError."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, sqlite3.OperationalError):
            text = str(seen).lower()
            return ("locked", _line(seen)) if "locked" in text or "busy" in text else None
        if isinstance(seen, sa_exc.DBAPIError):
            if seen.connection_invalidated:
                return "unreachable", _line(seen.orig or seen)
            orig = seen.orig
            if isinstance(orig, sqlite3.Error):
                seen = orig
                continue
            sqlstate = str(getattr(orig, "sqlstate", "") or "")
            if sqlstate.startswith("40"):  # serialization failure, deadlock: run it again
                return "conflict", _line(orig)
            if isinstance(seen, (sa_exc.OperationalError, sa_exc.InterfaceError)):
                return "unreachable", _line(orig)  # refused, reset, admin shutdown, cannot connect now
            return None
        if isinstance(seen, sa_exc.DisconnectionError):
            return "unreachable", _line(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def retrying(work: Callable[[], T], url: str, patience: float, clock: Clock | None = None) -> T:
    """``work()``, run again with backoff while it fails transiently, for at most ``patience``
    seconds of ``clock`` (default the system's)."""
    clock = clock or SystemClock()
    started = clock.now()
    delay = 0.05
    warned = False
    while True:
        try:
            return work()
        except Exception as exc:
            fault = transient(exc)
            if fault is None:
                raise
            kind, cause = fault
            waited = clock.now() - started
            if waited >= patience:
                raise DatabaseUnavailable(_message(kind, cause, url, waited)) from None
            if not warned:  # once per operation: a long outage must not flood the log
                _log.warning("database %s (%s); retrying for up to %.0f s", kind, cause, patience - waited)
                warned = True
            clock.sleep(min(delay, max(patience - waited, 0.0)))
            delay = min(delay * 2, 2.0)


def _message(fault: str, cause: str, url: str, waited: float) -> str:
    where = redacted(url)
    if fault == "locked":
        return f"database locked for {waited:.0f} s at {where}: another connection holds its write lock ({cause})"
    if fault == "conflict":
        return f"database at {where} kept aborting transactions for {waited:.0f} s: {cause}"
    return f"database unreachable at {where} for {waited:.0f} s: {cause}"
