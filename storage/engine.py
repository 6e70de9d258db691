"""Engines for the configured SQLAlchemy URL, with SQLite made safe for a long search."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

DEFAULT_URL = "sqlite:///evomerge.db"
SQLITE_BUSY_TIMEOUT_S = 60.0
DEFAULT_PATIENCE_S = 120.0


def patience_s() -> float:
    """Seconds to keep retrying a transient database fault (storage/retry.py):
    ``$EVOMERGE_DB_PATIENCE_S``, default 120."""
    raw = os.environ.get("EVOMERGE_DB_PATIENCE_S")
    try:
        value = float(raw) if raw else DEFAULT_PATIENCE_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"EVOMERGE_DB_PATIENCE_S={raw!r} is not a positive number of seconds")
    return value


def _sqlite_connector(database: str, patience: float) -> Callable[[], sqlite3.Connection]:
    """Connections with WAL journaling (readers never block the one writer), a busy timeout,
    and synchronous=NORMAL: in WAL mode a killed process loses no committed transaction,
    and commits skip an fsync each (a power cut may lose the last few, never consistency)."""

    # A statement waits at most a quarter of the patience for the lock; the retries do the rest.
    timeout = min(SQLITE_BUSY_TIMEOUT_S, max(1.0, patience / 4))

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(database, timeout=timeout, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    return connect


def engine_kwargs(url: str, patience: float | None = None) -> dict[str, Any]:
    """Keyword arguments for ``create_engine``, shared by our engine and Optuna's RDBStorage;
    ``patience`` (default :func:`patience_s`) bounds SQLite's wait for its lock."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return {"creator": _sqlite_connector(parsed.database, patience_s() if patience is None else patience)}
    if parsed.get_backend_name() == "sqlite":
        return {}
    return {"pool_pre_ping": True}


def make_engine(url: str, patience: float | None = None) -> Engine:
    return create_engine(url, **engine_kwargs(url, patience))


def redacted(url: str) -> str:
    """The URL with any password hidden, for messages."""
    return make_url(url).render_as_string(hide_password=True)
