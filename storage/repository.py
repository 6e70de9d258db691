"""The repository: the only code that reads or writes our tables.

Every method is one short transaction, so a controller killed at any instant leaves the
database consistent, and a transient fault (outage, lock) is retried as a whole
(storage/retry.py). Rows cross the boundary as frozen records, never ORM objects.

The controller lease is taken by one conditional UPDATE (atomic on SQLite, which ignores
``SELECT ... FOR UPDATE``, and on PostgreSQL). While a controller holds it, every write of
ours first extends the lease in the same transaction, conditionally on still owning it: a
controller that was paused past its lease and lost it to another is fenced at its next
write (:class:`LeaseLost`, nothing written).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from evomerge.storage.clock import Clock, SystemClock
from evomerge.storage.engine import make_engine
from evomerge.storage.kinds import Origin, Split, State
from evomerge.storage.migrations import upgrade
from evomerge.storage.records import (Attempt, CandidateRecord, StudyRecord, attempt_record, candidate_record,
                                      study_record)
from evomerge.storage.retry import patience_s, retrying
from evomerge.storage.tables import AttemptRow, CandidateRow, GenerationRow, StudyRow

__all__ = ["Attempt", "CandidateRecord", "LeaseError", "LeaseLost", "Repository", "StudyRecord"]

P = ParamSpec("P")
R = TypeVar("R")


class LeaseError(RuntimeError):
    """Another live controller drives this study."""


class LeaseLost(RuntimeError):
    """This controller's lease was taken over (it was paused or cut off past its expiry)."""


def _retried(method: Callable[P, R]) -> Callable[P, R]:
    """Run a repository method again through transient database faults (one transaction each)."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        repo = args[0]
        assert isinstance(repo, Repository)
        return retrying(lambda: method(*args, **kwargs), repo.url, repo.patience_s, repo.clock)

    return wrapper


class Repository:
    """Studies, candidates, attempts and generations of one database.

    ``patience``: seconds to retry a transient fault (default ``$EVOMERGE_DB_PATIENCE_S``).
    ``clock``: what leases, heartbeats, timestamps and the patience read (default the
    system's; a test passes one it moves forward)."""

    def __init__(self, url: str, patience: float | None = None, clock: Clock | None = None) -> None:
        self.url = url
        self.patience_s = patience_s() if patience is None else patience
        self.clock: Clock = clock or SystemClock()
        self.engine = make_engine(url, self.patience_s)
        # our tables made, or an older database migrated to this version (storage/migrations.py)
        retrying(lambda: upgrade(self.engine), url, self.patience_s, self.clock)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._fence: tuple[int, str, float] | None = None  # (study, owner, lease seconds) while leased

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        """A write transaction; while a lease is held, fenced by it (see the module doc)."""
        with self._session.begin() as s:
            if self._fence is not None:
                study_id, owner, seconds = self._fence
                kept = s.execute(update(StudyRow).where(StudyRow.id == study_id, StudyRow.lease_owner == owner)
                                 .values(lease_until=self.clock.now() + seconds))
                if kept.rowcount != 1:
                    raise LeaseLost(self._lost_message(s, study_id, owner))
            yield s

    @staticmethod
    def _lost_message(s: Session, study_id: int, owner: str) -> str:
        row = s.get(StudyRow, study_id)
        holder = row.lease_owner if row is not None else None
        name = row.name if row is not None else study_id
        return (f"controller {owner} lost the lease of study {name!r} (now held by {holder or 'nobody'}) "
                "while it was paused or cut off; stopped without writing")

    # --- studies ---------------------------------------------------------------------

    @_retried
    def get_study(self, name: str) -> StudyRecord | None:
        with self._session() as s:
            row = s.scalar(select(StudyRow).where(StudyRow.name == name))
            return study_record(row) if row else None

    @_retried
    def create_study(self, name: str, config_json: str, merge_arithmetic: int | None = None,
                     device: str | None = None) -> StudyRecord:
        with self._tx() as s:
            row = StudyRow(name=name, config_json=config_json, created_at=self.clock.now(),
                           merge_arithmetic=merge_arithmetic, device=device)
            s.add(row)
            s.flush()
            return study_record(row)

    @_retried
    def study_names(self) -> list[str]:
        with self._session() as s:
            return list(s.scalars(select(StudyRow.name).order_by(StudyRow.id)))

    @_retried
    def acquire_lease(self, study_id: int, owner: str, seconds: float, owner_alive: Callable[[str], bool]) -> None:
        """Take the study's controller lease, or raise :class:`LeaseError`; ``owner_alive(owner)``
        judges an unexpired lease held by another. From here on, every write is fenced by it."""
        now = self.clock.now()
        take = update(StudyRow).values(lease_owner=owner, lease_until=now + seconds)
        with self._session.begin() as s:
            # One statement decides: free, expired, or already ours.
            won = s.execute(take.where(StudyRow.id == study_id, or_(
                StudyRow.lease_owner.is_(None), StudyRow.lease_owner == owner, StudyRow.lease_until < now)))
            if won.rowcount != 1:
                row = s.get(StudyRow, study_id)
                assert row is not None
                holder, until = row.lease_owner, row.lease_until
                if holder is None or owner_alive(holder):
                    raise LeaseError(f"study {row.name!r} is driven by controller {holder} "
                                     f"(lease until {time.ctime(until or now)})")
                # Its holder died before the expiry: take it over, unless it changed hands meanwhile.
                won = s.execute(take.where(StudyRow.id == study_id, StudyRow.lease_owner == holder))
                if won.rowcount != 1:
                    raise LeaseError(f"study {row.name!r}: another controller took the lease just now")
        self._fence = (study_id, owner, seconds)

    @_retried
    def renew_lease(self, study_id: int, owner: str, seconds: float) -> None:
        """Extend the lease; raises :class:`LeaseLost` if another controller took it."""
        with self._session.begin() as s:
            kept = s.execute(update(StudyRow).where(StudyRow.id == study_id, StudyRow.lease_owner == owner)
                             .values(lease_until=self.clock.now() + seconds))
            if kept.rowcount != 1:
                raise LeaseLost(self._lost_message(s, study_id, owner))

    @_retried
    def release_lease(self, study_id: int, owner: str) -> None:
        self._fence = None
        with self._session.begin() as s:
            s.execute(update(StudyRow).where(StudyRow.id == study_id, StudyRow.lease_owner == owner)
                      .values(lease_owner=None, lease_until=None))

    @_retried
    def check_lease(self) -> None:
        """Raise :class:`LeaseLost` if the lease held here was taken over (extends it otherwise)."""
        with self._tx():
            pass

    def drop_fence(self) -> None:
        """Forget the lease without writing (after it was lost, or the database went away)."""
        self._fence = None

    @property
    def holds_lease(self) -> bool:
        """A lease was acquired here and is neither released nor dropped."""
        return self._fence is not None

    # --- candidates ------------------------------------------------------------------

    @_retried
    def add_candidate(self, study_id: int, recipe_json: str, recipe_hash: str, origin: Origin,
                      generation: int | None = None, genes: tuple[float, ...] | None = None) -> int:
        now = self.clock.now()
        with self._tx() as s:
            row = CandidateRow(study_id=study_id, origin=origin, generation=generation,
                               genes_json=json.dumps(list(genes)) if genes is not None else None,
                               recipe_json=recipe_json, recipe_hash=recipe_hash, state=State.QUEUED,
                               attempt=0, created_at=now, updated_at=now)
            s.add(row)
            s.flush()
            return row.id

    @_retried
    def candidate(self, candidate_id: int) -> CandidateRecord:
        with self._session() as s:
            row = s.get(CandidateRow, candidate_id)
            if row is None:
                raise KeyError(f"no candidate {candidate_id}")
            return candidate_record(row)

    @_retried
    def candidates(self, study_id: int) -> list[CandidateRecord]:
        with self._session() as s:
            rows = s.scalars(select(CandidateRow).where(CandidateRow.study_id == study_id)
                             .order_by(CandidateRow.id))
            return [candidate_record(r) for r in rows]

    @_retried
    def recent_fitnesses(self, study_id: int, count: int) -> list[float]:
        """The fitness of the last ``count`` complete candidates that are not duplicates, in
        the order they were proposed (racing's bar reads them at every dispatch: one query of
        ``count`` rows, not the whole study)."""
        with self._session() as s:
            values = s.scalars(select(CandidateRow.fitness).where(
                CandidateRow.study_id == study_id, CandidateRow.state == State.COMPLETE,
                CandidateRow.fitness.is_not(None), CandidateRow.duplicate_of.is_(None))
                .order_by(CandidateRow.id.desc()).limit(count))
            return [float(v) for v in values][::-1]

    @_retried
    def completed_with_hash(self, study_id: int, recipe_hash: str) -> CandidateRecord | None:
        with self._session() as s:
            row = s.scalar(select(CandidateRow).where(
                CandidateRow.study_id == study_id, CandidateRow.recipe_hash == recipe_hash,
                CandidateRow.state == State.COMPLETE, CandidateRow.duplicate_of.is_(None)).limit(1))
            return candidate_record(row) if row else None

    @_retried
    def start_attempt(self, candidate_id: int, trial_number: int | None, split: Split) -> int:
        """Mark a candidate running and open an attempt row; returns the attempt number."""
        now = self.clock.now()
        with self._tx() as s:
            row = s.get(CandidateRow, candidate_id)
            assert row is not None
            if split == Split.SEARCH:
                row.attempt += 1
                row.state = State.RUNNING
                row.trial_number = trial_number if trial_number is not None else row.trial_number
            row.updated_at = now
            attempt = row.attempt
            s.add(AttemptRow(candidate_id=candidate_id, attempt=attempt, split=split, started_at=now))
            return attempt

    @_retried
    def end_attempt(self, candidate_id: int, split: Split, worker: str | None, outcome: str, *,
                    ran: bool = True) -> None:
        """Close the candidate's open ``split`` attempt: where, how (``"ok"`` or the reason) and
        whether its job ran (False: it never started)."""
        with self._tx() as s:
            row = s.scalar(select(AttemptRow).where(
                AttemptRow.candidate_id == candidate_id, AttemptRow.split == split,
                AttemptRow.ended_at.is_(None)).order_by(AttemptRow.id.desc()).limit(1))
            if row is not None:
                row.ended_at, row.worker, row.outcome, row.ran = self.clock.now(), worker, outcome[:1000], ran

    @_retried
    def end_open_attempts(self, study_id: int, split: Split, outcome: str) -> int:
        """Close every open ``split`` attempt of the study (abandoned by a stop); returns how many."""
        with self._tx() as s:
            ids = select(CandidateRow.id).where(CandidateRow.study_id == study_id)
            closed = s.execute(update(AttemptRow).where(
                AttemptRow.candidate_id.in_(ids), AttemptRow.split == split, AttemptRow.ended_at.is_(None))
                .values(ended_at=self.clock.now(), outcome=outcome))
            return int(closed.rowcount)

    @_retried
    def complete(self, candidate_id: int, *, scores: dict[str, float], fitness: float, worker: str | None,
                 materialize_s: float | None, evaluate_s: float | None, duplicate_of: int | None = None,
                 documents: int | None = None, raced_out: bool = False,
                 evaluate_cpu_s: float | None = None) -> None:
        """Record a scored candidate (keyword arguments only: ten values of one shape)."""
        with self._tx() as s:
            row = s.get(CandidateRow, candidate_id)
            assert row is not None
            row.state, row.scores_json, row.fitness = State.COMPLETE, json.dumps(scores), fitness
            row.worker, row.materialize_s, row.evaluate_s = worker, materialize_s, evaluate_s
            row.duplicate_of, row.error, row.updated_at = duplicate_of, None, self.clock.now()
            row.documents, row.raced_out, row.evaluate_cpu_s = documents, raced_out, evaluate_cpu_s

    @_retried
    def fail(self, candidate_id: int, reason: str, worker: str | None = None) -> None:
        with self._tx() as s:
            row = s.get(CandidateRow, candidate_id)
            assert row is not None
            row.state, row.error, row.worker, row.updated_at = State.FAILED, reason[:2000], worker, self.clock.now()

    @_retried
    def requeue(self, candidate_id: int, reason: str) -> None:
        """Back to the queue (a worker died, or the controller did): the attempt stays counted."""
        with self._tx() as s:
            row = s.get(CandidateRow, candidate_id)
            assert row is not None
            row.state, row.error, row.updated_at = State.QUEUED, reason[:2000], self.clock.now()

    @_retried
    def set_heldout(self, candidate_id: int, scores: dict[str, float], fitness: float) -> None:
        with self._tx() as s:
            row = s.get(CandidateRow, candidate_id)
            assert row is not None
            row.heldout_json, row.heldout_fitness = json.dumps(scores), fitness

    @_retried
    def touch(self, candidate_ids: list[int]) -> None:
        """Heartbeat of running candidates."""
        if candidate_ids:
            with self._tx() as s:
                s.execute(update(CandidateRow).where(CandidateRow.id.in_(candidate_ids))
                          .values(updated_at=self.clock.now()))

    def spent_attempts(self, candidate_id: int, split: Split) -> int:
        """The candidate's ``split`` attempts whose job ran (or may have): one that never started is free."""
        return sum(1 for a in self.attempts(candidate_id) if a.split == split and a.ran)

    @_retried
    def attempts(self, candidate_id: int) -> list[Attempt]:
        """The candidate's attempts, oldest first."""
        with self._session() as s:
            rows = s.scalars(select(AttemptRow).where(AttemptRow.candidate_id == candidate_id)
                             .order_by(AttemptRow.id))
            return [attempt_record(r) for r in rows]

    # --- generations -----------------------------------------------------------------

    @_retried
    def add_generation(self, study_id: int, index: int, candidate_ids: list[int]) -> None:
        with self._tx() as s:
            s.add(GenerationRow(study_id=study_id, index=index, candidate_ids_json=json.dumps(candidate_ids),
                                created_at=self.clock.now()))

    @_retried
    def generations(self, study_id: int) -> list[list[int]]:
        with self._session() as s:
            rows = s.scalars(select(GenerationRow).where(GenerationRow.study_id == study_id)
                             .order_by(GenerationRow.index))
            return [json.loads(r.candidate_ids_json) for r in rows]
