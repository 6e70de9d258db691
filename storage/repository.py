"""The repository: the only code that reads or writes our tables.

Every method is one short transaction, so a controller killed at any instant leaves the
database consistent. Rows cross the boundary as frozen records, never ORM objects.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.engine import make_engine
from storage.tables import AttemptRow, Base, CandidateRow, GenerationRow, StudyRow


class LeaseError(RuntimeError):
    """Another live controller drives this study."""


@dataclass(frozen=True)
class StudyRecord:
    id: int
    name: str
    config_json: str


@dataclass(frozen=True)
class CandidateRecord:
    id: int
    trial_number: int | None
    origin: str
    generation: int | None
    genes: tuple[float, ...] | None
    recipe_json: str
    recipe_hash: str
    state: str
    duplicate_of: int | None
    scores: dict[str, float] | None
    fitness: float | None
    heldout: dict[str, float] | None
    heldout_fitness: float | None
    materialize_s: float | None
    evaluate_s: float | None
    worker: str | None
    attempt: int
    error: str | None


def _record(row: CandidateRow) -> CandidateRecord:
    return CandidateRecord(
        id=row.id, trial_number=row.trial_number, origin=row.origin, generation=row.generation,
        genes=tuple(json.loads(row.genes_json)) if row.genes_json else None,
        recipe_json=row.recipe_json, recipe_hash=row.recipe_hash, state=row.state,
        duplicate_of=row.duplicate_of,
        scores=json.loads(row.scores_json) if row.scores_json else None, fitness=row.fitness,
        heldout=json.loads(row.heldout_json) if row.heldout_json else None,
        heldout_fitness=row.heldout_fitness, materialize_s=row.materialize_s,
        evaluate_s=row.evaluate_s, worker=row.worker, attempt=row.attempt, error=row.error)


class Repository:
    """Studies, candidates, attempts and generations of one database."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    def _tx(self) -> Session:
        return self._session.begin()  # type: ignore[return-value]

    # --- studies ---------------------------------------------------------------------

    def get_study(self, name: str) -> StudyRecord | None:
        with self._session() as s:
            row = s.scalar(select(StudyRow).where(StudyRow.name == name))
            return StudyRecord(row.id, row.name, row.config_json) if row else None

    def create_study(self, name: str, config_json: str) -> StudyRecord:
        with self._tx() as s:
            row = StudyRow(name=name, config_json=config_json, created_at=time.time())
            s.add(row)
            s.flush()
            return StudyRecord(row.id, row.name, row.config_json)

    def study_names(self) -> list[str]:
        with self._session() as s:
            return list(s.scalars(select(StudyRow.name).order_by(StudyRow.id)))

    def acquire_lease(self, study_id: int, owner: str, seconds: float, owner_alive: Any) -> None:
        """Take the study's controller lease; ``owner_alive(owner)`` judges a held one."""
        with self._tx() as s:
            row = s.get(StudyRow, study_id, with_for_update=True)
            assert row is not None
            held = row.lease_owner and row.lease_owner != owner and (row.lease_until or 0) > time.time()
            if held and owner_alive(row.lease_owner):
                raise LeaseError(f"study {row.name!r} is driven by controller {row.lease_owner} "
                                 f"(lease until {time.ctime(row.lease_until)})")
            row.lease_owner, row.lease_until = owner, time.time() + seconds

    def renew_lease(self, study_id: int, owner: str, seconds: float) -> None:
        with self._tx() as s:
            s.execute(update(StudyRow).where(StudyRow.id == study_id, StudyRow.lease_owner == owner)
                      .values(lease_until=time.time() + seconds))

    def release_lease(self, study_id: int, owner: str) -> None:
        with self._tx() as s:
            s.execute(update(StudyRow).where(StudyRow.id == study_id, StudyRow.lease_owner == owner)
                      .values(lease_owner=None, lease_until=None))

    # --- candidates ------------------------------------------------------------------

    def add_candidate(self, study_id: int, recipe_json: str, recipe_hash: str, origin: str,
                      generation: int | None = None, genes: tuple[float, ...] | None = None) -> int:
        now = time.time()
        with self._tx() as s:
            row = CandidateRow(study_id=study_id, origin=origin, generation=generation,
                               genes_json=json.dumps(list(genes)) if genes is not None else None,
                               recipe_json=recipe_json, recipe_hash=recipe_hash, state="queued",
                               attempt=0, created_at=now, updated_at=now)
            s.add(row)
            s.flush()
            return row.id

    def candidate(self, candidate_id: int) -> CandidateRecord:
        with self._session() as s:
            row = s.get(CandidateRow, candidate_id)
            if row is None:
                raise KeyError(f"no candidate {candidate_id}")
            return _record(row)

    def candidates(self, study_id: int) -> list[CandidateRecord]:
        with self._session() as s:
            rows = s.scalars(select(CandidateRow).where(CandidateRow.study_id == study_id)
                             .order_by(CandidateRow.id))
            return [_record(r) for r in rows]

    def completed_with_hash(self, study_id: int, recipe_hash: str) -> CandidateRecord | None:
        with self._session() as s:
            row = s.scalar(select(CandidateRow).where(
                CandidateRow.study_id == study_id, CandidateRow.recipe_hash == recipe_hash,
                CandidateRow.state == "complete", CandidateRow.duplicate_of.is_(None)).limit(1))
            return _record(row) if row else None

    def start_attempt(self, candidate_id: int, trial_number: int | None, split: str) -> int:
        """Mark a candidate running and open an attempt row; returns the attempt number."""
        now = time.time()
        with self._tx() as s:
            row = s.get(CandidateRow, candidate_id)
            assert row is not None
            if split == "search":
                row.attempt += 1
                row.state = "running"
                row.trial_number = trial_number if trial_number is not None else row.trial_number
            row.updated_at = now
            attempt = row.attempt
            s.add(AttemptRow(candidate_id=candidate_id, attempt=attempt, split=split, started_at=now))
            return attempt

    def end_attempt(self, candidate_id: int, split: str, worker: str | None, outcome: str) -> None:
        with self._tx() as s:
            row = s.scalar(select(AttemptRow).where(
                AttemptRow.candidate_id == candidate_id, AttemptRow.split == split,
                AttemptRow.ended_at.is_(None)).order_by(AttemptRow.id.desc()).limit(1))
            if row is not None:
                row.ended_at, row.worker, row.outcome = time.time(), worker, outcome[:1000]

    def complete(self, candidate_id: int, scores: dict[str, float], fitness: float, worker: str | None,
                 materialize_s: float | None, evaluate_s: float | None, duplicate_of: int | None = None) -> None:
        with self._tx() as s:
            row = s.get(CandidateRow, candidate_id)
            assert row is not None
            row.state, row.scores_json, row.fitness = "complete", json.dumps(scores), fitness
            row.worker, row.materialize_s, row.evaluate_s = worker, materialize_s, evaluate_s
            row.duplicate_of, row.error, row.updated_at = duplicate_of, None, time.time()

    def fail(self, candidate_id: int, reason: str, worker: str | None = None) -> None:
        with self._tx() as s:
            row = s.get(CandidateRow, candidate_id)
            assert row is not None
            row.state, row.error, row.worker, row.updated_at = "failed", reason[:2000], worker, time.time()

    def requeue(self, candidate_id: int, reason: str) -> None:
        """Back to the queue (a worker died, or the controller did): the attempt stays counted."""
        with self._tx() as s:
            row = s.get(CandidateRow, candidate_id)
            assert row is not None
            row.state, row.error, row.updated_at = "queued", reason[:2000], time.time()

    def set_heldout(self, candidate_id: int, scores: dict[str, float], fitness: float) -> None:
        with self._tx() as s:
            row = s.get(CandidateRow, candidate_id)
            assert row is not None
            row.heldout_json, row.heldout_fitness = json.dumps(scores), fitness

    def touch(self, candidate_ids: list[int]) -> None:
        """Heartbeat of running candidates."""
        if candidate_ids:
            with self._tx() as s:
                s.execute(update(CandidateRow).where(CandidateRow.id.in_(candidate_ids))
                          .values(updated_at=time.time()))

    def attempts(self, candidate_id: int) -> list[tuple[int, str, str | None, str | None]]:
        with self._session() as s:
            rows = s.scalars(select(AttemptRow).where(AttemptRow.candidate_id == candidate_id)
                             .order_by(AttemptRow.id))
            return [(r.attempt, r.split, r.worker, r.outcome) for r in rows]

    # --- generations -----------------------------------------------------------------

    def add_generation(self, study_id: int, index: int, candidate_ids: list[int]) -> None:
        with self._tx() as s:
            s.add(GenerationRow(study_id=study_id, index=index, candidate_ids_json=json.dumps(candidate_ids),
                                created_at=time.time()))

    def generations(self, study_id: int) -> list[list[int]]:
        with self._session() as s:
            rows = s.scalars(select(GenerationRow).where(GenerationRow.study_id == study_id)
                             .order_by(GenerationRow.index))
            return [json.loads(r.candidate_ids_json) for r in rows]
