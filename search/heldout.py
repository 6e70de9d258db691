"""Held-out re-scoring: the baselines and the search's leaders scored on the split the search
never saw, after the search. The controller's dispatch loop runs it (the same loop as the
search's); this module says what is scored and records what comes back."""

from __future__ import annotations

from collections import deque

from evomerge.evaluators.fitness import ScoreError, fitness
from evomerge.evaluators.spec import TaskSpec
from evomerge.search.config import SearchConfig
from evomerge.search.observers import Observers
from evomerge.search.origins import evolved
from evomerge.storage.kinds import Split, State
from evomerge.storage.repository import CandidateRecord, Repository
from evomerge.workers.pool import Crash, WorkerPool
from evomerge.workers.result import Job, Scored, TrialResult


class HeldoutRescoring:
    """Which candidates to re-score, their jobs, and their outcomes."""

    def __init__(self, cfg: SearchConfig, repo: Repository, tasks: tuple[TaskSpec, ...],
                 observers: Observers) -> None:
        self.cfg, self.repo, self.tasks, self.observers = cfg, repo, tasks, observers
        self.failed: dict[int, str] = {}  # candidate -> why its re-score failed
        self.todo: deque[CandidateRecord] = deque()
        self.scored = 0

    def choose(self, cands: list[CandidateRecord]) -> bool:
        """Queue the baselines and the top ``evaluation.heldout_top_k`` evolved candidates not
        yet scored (none when the config has no held-out split); whether any is to score."""
        self.scored = 0
        if self.cfg.evaluation.heldout_split is None:
            return False
        done = [c for c in cands if c.state == State.COMPLETE and c.duplicate_of is None]
        leaders = sorted((c for c in done if evolved(c)), key=lambda c: -(c.fitness or 0.0))
        chosen = [c for c in done if not evolved(c)] + leaders[: self.cfg.evaluation.heldout_top_k]
        self.todo = deque(c for c in chosen if c.heldout is None)
        return bool(self.todo)

    def fill(self, pool: WorkerPool) -> None:
        """Give every idle worker the next candidate to re-score."""
        while self.todo and pool.idle():
            cand = self.todo.popleft()
            self.repo.start_attempt(cand.id, None, Split.HELDOUT)
            pool.submit(Job(cand.id, cand.recipe_json, heldout=True))

    def finished(self, pool: WorkerPool) -> bool:
        return not self.todo and not pool.busy_jobs()

    def handle(self, result: TrialResult | Crash) -> None:
        """Record one re-score (counted in ``scored``). A job that never ran, or a crash with
        attempts left, goes back in the queue."""
        cid = result.job.candidate_id
        outcome = result.reason if isinstance(result, Crash) else result.ended
        self.repo.end_attempt(cid, Split.HELDOUT, result.worker, outcome,
                              ran=not isinstance(result, Crash) or result.ran)
        if isinstance(result, Crash):
            if not result.ran or self.repo.spent_attempts(cid, Split.HELDOUT) < self.cfg.workers.max_attempts:
                self.todo.append(self.repo.candidate(cid))
            else:
                self.failed[cid] = result.reason
            return
        if not isinstance(result.outcome, Scored):
            self.failed[cid] = result.outcome.reason
            return
        try:
            value = fitness(result.outcome.scores, self.tasks)
        except ScoreError as exc:
            self.failed[cid] = str(exc)
            return
        self.failed.pop(cid, None)
        self.repo.set_heldout(cid, result.outcome.scores, value)
        self.scored += 1
        self.observers.heldout_scored(self.repo.candidate(cid))
