"""What a worker sends back: typed results, never ``None`` sentinels."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    """One evaluation request: a candidate's recipe, on the search or held-out split."""

    candidate_id: int
    recipe_json: str
    heldout: bool = False
    attempt: int = 1
    bar: float | None = None  # racing: the fitness worth finishing for (None: score in full)


@dataclass(frozen=True)
class Scored:
    scores: dict[str, float]


@dataclass(frozen=True)
class Failed:
    reason: str  # one line


@dataclass(frozen=True)
class TrialResult:
    """The outcome of a :class:`Job` with where and how long it took."""

    job: Job
    outcome: Scored | Failed
    worker: str
    materialize_s: float
    evaluate_s: float
    documents: int | None = None  # documents scored (search split)
    complete: bool = True  # False: racing stopped it after the first stage
    evaluate_cpu_s: float = 0.0  # CPU seconds of the worker process while scoring (all its threads)

    @property
    def ended(self) -> str:
        """How its attempt ended, as stored: "ok", or the failure's reason."""
        return "ok" if isinstance(self.outcome, Scored) else self.outcome.reason
