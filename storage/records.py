"""What the repository hands out: frozen records of our rows, never ORM objects."""

from __future__ import annotations

import json
from dataclasses import dataclass

from evomerge.storage.kinds import Origin, Split, State
from evomerge.storage.tables import AttemptRow, CandidateRow, StudyRow


@dataclass(frozen=True)
class StudyRecord:
    id: int
    name: str
    config_json: str
    merge_arithmetic: int | None = None  # None: stored before versions were recorded (1)
    device: str | None = None  # where its workers merged: "cpu", "cuda" (None: not recorded)


@dataclass(frozen=True)
class CandidateRecord:
    id: int
    trial_number: int | None
    origin: Origin
    generation: int | None
    genes: tuple[float, ...] | None
    recipe_json: str
    recipe_hash: str
    state: State
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
    documents: int | None = None  # search documents its scores rest on (None: not recorded)
    raced_out: bool = False  # racing stopped it after the first stage
    evaluate_cpu_s: float | None = None  # the worker's CPU seconds while scoring (None: not recorded)


@dataclass(frozen=True)
class Attempt:
    """One dispatch of a candidate to a worker: which of the candidate's attempts, on which
    split, where, and how it ended (None while open; "ok" or the reason otherwise)."""

    attempt: int
    split: Split
    worker: str | None
    outcome: str | None
    started_at: float
    ended_at: float | None
    ran: bool = True  # False: its job never started (it spends none of the candidate's attempts)


def study_record(row: StudyRow) -> StudyRecord:
    return StudyRecord(row.id, row.name, row.config_json, row.merge_arithmetic, row.device)


def candidate_record(row: CandidateRow) -> CandidateRecord:
    return CandidateRecord(
        id=row.id, trial_number=row.trial_number, origin=row.origin, generation=row.generation,
        genes=tuple(json.loads(row.genes_json)) if row.genes_json else None,
        recipe_json=row.recipe_json, recipe_hash=row.recipe_hash, state=row.state,
        duplicate_of=row.duplicate_of,
        scores=json.loads(row.scores_json) if row.scores_json else None, fitness=row.fitness,
        heldout=json.loads(row.heldout_json) if row.heldout_json else None,
        heldout_fitness=row.heldout_fitness, materialize_s=row.materialize_s,
        evaluate_s=row.evaluate_s, worker=row.worker, attempt=row.attempt, error=row.error,
        documents=row.documents, raced_out=bool(row.raced_out), evaluate_cpu_s=row.evaluate_cpu_s)


def attempt_record(row: AttemptRow) -> Attempt:
    return Attempt(row.attempt, row.split, row.worker, row.outcome, row.started_at, row.ended_at, row.ran)
