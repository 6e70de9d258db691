"""The typed storage boundary: enum columns that store today's strings and refuse others, the
Attempt record, and the retry patience measured on an injected clock (no real waiting)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import StatementError

from evomerge.search.optimizers import OPTIMIZERS
from evomerge.storage.kinds import Origin, Split, State
from evomerge.storage.repository import Attempt, Repository
from evomerge.storage.retry import DatabaseUnavailable, retrying
from tests.clocks import SteppedClock


def test_every_optimizer_is_an_origin() -> None:
    """A candidate's origin is its optimizer's name: a new optimizer needs an Origin member
    and a revision widening the column's CHECK constraint (storage/kinds.py)."""
    assert set(OPTIMIZERS) <= {o.value for o in Origin}


def test_kinds_store_the_strings_of_before_and_refuse_others(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    repo = Repository(f"sqlite:///{db}", clock=SteppedClock())
    study = repo.create_study("k", "{}")
    cid = repo.add_candidate(study.id, "{}", "h", Origin.CMA, 0, (0.5,))
    repo.start_attempt(cid, 0, Split.SEARCH)
    repo.end_attempt(cid, Split.SEARCH, "w0", "ok")
    repo.complete(cid, scores={"t": 1.0}, fitness=1.0, worker="w0", materialize_s=0.1, evaluate_s=0.2)
    with sqlite3.connect(db) as conn:  # the stored values are the strings evomerge always wrote
        assert conn.execute("SELECT origin, state FROM evomerge_candidates").fetchall() == [("cma", "complete")]
        assert conn.execute("SELECT split FROM evomerge_attempts").fetchall() == [("search",)]
    cand = repo.candidate(cid)
    assert cand.state is State.COMPLETE and cand.origin is Origin.CMA and cand.state == "complete"
    assert repo.attempts(cid) == [Attempt(1, Split.SEARCH, "w0", "ok", 1_800_000_000.0, 1_800_000_000.0)]
    with pytest.raises(StatementError):  # refused before it reaches the database
        repo.add_candidate(study.id, "{}", "h", "sideways")  # type: ignore[arg-type]
    with repo.engine.begin() as conn, pytest.raises(Exception, match="CHECK constraint failed"):
        conn.execute(text("UPDATE evomerge_candidates SET state = 'lost'"))  # and by the database
    repo.close()


def _locked() -> int:
    raise sqlite3.OperationalError("database is locked")


def test_patience_runs_out_on_the_clock() -> None:
    clock = SteppedClock()
    with pytest.raises(DatabaseUnavailable, match=r"database locked for 120 s at sqlite:///x\.db"):
        retrying(_locked, "sqlite:///x.db", 120.0, clock)
    assert clock.slept == pytest.approx(120.0)  # backed off 0.05 s doubling to 2 s, none of it real


def test_a_fault_shorter_than_the_patience_is_waited_out() -> None:
    clock = SteppedClock()
    ends = clock.now() + 30.0

    def work() -> str:
        return "done" if clock.now() >= ends else str(_locked())

    assert retrying(work, "sqlite:///x.db", 120.0, clock) == "done"
    assert 30.0 <= clock.slept <= 32.0  # at most one 2 s backoff past the fault's end


def test_other_errors_are_raised_at_once() -> None:
    clock = SteppedClock()

    def work() -> int:
        raise sqlite3.OperationalError("no such table: x")

    with pytest.raises(sqlite3.OperationalError):
        retrying(work, "sqlite:///x.db", 120.0, clock)
    assert clock.slept == 0.0
