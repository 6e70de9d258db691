"""Where each outcome of the search is written, and in which order.

Our candidate row comes first (it is what a resume trusts), then the Optuna trial the
dashboard shows, then the optimizer (search/teller.py) and the observers. A stop between two
writes is reconciled on resume from the candidate row (search/controller.py)."""

from __future__ import annotations

from evomerge.search.ledger import Ledger
from evomerge.search.observers import Observers
from evomerge.search.origins import evolved
from evomerge.search.spaces import Space
from evomerge.search.teller import Teller
from evomerge.storage.kinds import Split, State
from evomerge.storage.repository import CandidateRecord, Repository
from evomerge.workers.recipe import Recipe
from evomerge.workers.result import TrialResult


class Recorder:
    """Writes one study's trials and outcomes."""

    def __init__(self, repo: Repository, ledger: Ledger, space: Space, teller: Teller, observers: Observers) -> None:
        self.repo, self.ledger, self.space, self.teller, self.observers = repo, ledger, space, teller, observers

    def open_trial(self, cand: CandidateRecord, recipe: Recipe) -> int:
        """The candidate's Optuna trial, opened (its number); its parameters when the space has it."""
        mine = evolved(cand) or self.space.belongs(recipe)
        params = self.space.params_of(recipe) if mine else {}
        bounds = self.space.bounds() if mine else {}
        attrs = {"candidate_id": cand.id, "origin": cand.origin, "recipe": recipe.summary(),
                 "recipe_hash": cand.recipe_hash, "generation": cand.generation, "attempt": cand.attempt + 1}
        self.repo.check_lease()  # Optuna's write comes before ours here: a fenced controller must not make it
        return self.ledger.open_trial(params, bounds, attrs)

    def complete(self, cand: CandidateRecord, number: int, result: TrialResult, scores: dict[str, float],
                 value: float) -> None:
        """A scored candidate: its scores and fitness, the trial's values and one attribute per task."""
        self.repo.complete(cand.id, scores=scores, fitness=value, worker=result.worker,
                           materialize_s=result.materialize_s, evaluate_s=result.evaluate_s,
                           documents=result.documents, raced_out=not result.complete,
                           evaluate_cpu_s=result.evaluate_cpu_s)
        cand = self.repo.candidate(cand.id)
        # One attribute per task score, so the dashboard's trial table shows them as columns.
        self.ledger.complete(number, self.teller.values(cand) or (value,), {
            **{f"score.{task}": score for task, score in scores.items()},
            "worker": result.worker, "documents": result.documents, "raced_out": not result.complete,
            "seconds": {"materialize": round(result.materialize_s, 4), "evaluate": round(result.evaluate_s, 4),
                        "evaluate_cpu": round(result.evaluate_cpu_s, 4)}})
        self._tell(cand)

    def duplicate(self, cid: int, number: int, twin: CandidateRecord) -> int:
        """A candidate settled by its identical twin's outcome; returns 1 (it is finished)."""
        self.repo.end_attempt(cid, Split.SEARCH, None, f"duplicate of candidate {twin.id}")
        if twin.state != State.COMPLETE or twin.fitness is None:
            return self.fail(self.repo.candidate(cid), number, f"duplicate of failed candidate {twin.id}", None)
        self.repo.complete(cid, scores=twin.scores or {}, fitness=twin.fitness, worker=None, materialize_s=0.0,
                           evaluate_s=0.0, duplicate_of=twin.id, documents=twin.documents,
                           raced_out=twin.raced_out, evaluate_cpu_s=0.0)
        cand = self.repo.candidate(cid)
        self.ledger.complete(number, self.teller.values(cand) or (twin.fitness,), {"duplicate_of": twin.id})
        self._tell(cand)
        return 1

    def fail(self, cand: CandidateRecord, number: int, reason: str, worker: str | None) -> int:
        """A failed candidate, for good; returns 1 (it is finished)."""
        self.repo.fail(cand.id, reason, worker)
        self.ledger.fail(number, reason)
        self._tell(self.repo.candidate(cand.id))
        return 1

    def _tell(self, cand: CandidateRecord) -> None:
        self.observers.finished(cand)
        self.teller.tell(cand)
