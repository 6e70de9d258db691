"""The closed sets of values our tables store: candidate state, attempt split, candidate origin.

Each is a :class:`~enum.StrEnum` whose values are the strings evomerge has always stored,
so a member equals its string, and studies written before these types existed read back
unchanged. The columns are SQLAlchemy ``Enum`` columns stored as VARCHAR with a CHECK
constraint (``native_enum=False``): a PostgreSQL enum type would need its own
``CREATE TYPE``/``ALTER TYPE`` steps in every migration that adds a value.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """Where a candidate is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        """Completed or failed: it counts against the trial budget."""
        return self in (State.COMPLETE, State.FAILED)


class Split(StrEnum):
    """Which documents an attempt scored a candidate on."""

    SEARCH = "search"
    HELDOUT = "heldout"


class Origin(StrEnum):
    """Who proposed a candidate: a baseline (a source model as itself, an untuned merge) or
    the optimizer of that name (``search/optimizers``, ``Optimizer.name``).

    A new optimizer needs a member here and a migration that widens the column's CHECK
    constraint (storage/revisions/); tests/test_storage_types.py checks that every
    registered optimizer has one."""

    SOURCE = "source"
    UNTUNED = "untuned"
    CMA = "cma"
    RANDOM = "random"
    TPE = "tpe"
    GP = "gp"
    NSGA2 = "nsga2"
