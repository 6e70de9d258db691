"""The controller: proposes candidates, keeps every worker busy, persists, resumes.

One controller drives a study at a time (search/lease.py). Everything it learns is written
before it acts on it (search/recording.py), so ``kill -9`` at any point loses at most the work
in flight, which the next start re-queues (search/recovery.py) before rebuilding the optimizer
from the stored outcomes (search/teller.py); a resumed search is consistent, not bit-identical
(proposals come from a fresh random stream). It names no optimizer, no space and no observer:
the commands give it the space (search/spaces.py) and the observers (search/observers.py).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from evomerge.evaluators.fitness import ScoreError, fitness
from evomerge.search import signals
from evomerge.search.config import SearchConfig
from evomerge.search.heldout import HeldoutRescoring
from evomerge.search.lease import HEARTBEAT_S, StudyLease
from evomerge.search.ledger import Ledger
from evomerge.search.observers import LoopState, Observers, SearchObserver
from evomerge.search.optimizers.base import default_popsize
from evomerge.search.origins import evolved
from evomerge.search.ranking import best_candidate
from evomerge.search.recovery import requeue_running, seed_baselines
from evomerge.search.recording import Recorder
from evomerge.search.spaces import Space
from evomerge.search.teller import Teller
from evomerge.storage.kinds import Origin, Split, State
from evomerge.storage.repository import CandidateRecord, LeaseLost, Repository
from evomerge.storage.retry import DatabaseUnavailable
from evomerge.workers.pool import Crash, WorkerPool
from evomerge.workers.recipe import Recipe, parse_recipe
from evomerge.workers.result import Failed, Job, TrialResult


class StudyMismatch(ValueError):
    """The named study exists with a different definition; one line."""


@dataclass(frozen=True)
class RunSummary:
    done: int
    evaluated_now: int
    best_candidate: int | None
    best_fitness: float | None
    utilisation: float
    elapsed_s: float


class Controller:
    """Drives one study: ``run`` the search, then ``rescore_heldout`` the leaders."""

    def __init__(self, cfg: SearchConfig, repo: Repository, ledger: Ledger, space: Space,
                 pool_factory: Callable[[], WorkerPool], study_id: int,
                 observers: Sequence[SearchObserver] = ()) -> None:
        """``observers`` hear of the search's progress and outcomes (progress display,
        dashboard, tracking: the commands choose them)."""
        self.cfg, self.repo, self.ledger, self.space = cfg, repo, ledger, space
        self.study_id = study_id
        self._pool_factory = pool_factory
        self.pool: WorkerPool | None = None
        self.lease = StudyLease(repo, study_id)
        self.popsize = cfg.optimizer.popsize or default_popsize(space.dim)
        self.teller = Teller(cfg, repo, ledger, space, study_id, self.popsize)
        self.observers = Observers(observers)
        self.heldout = HeldoutRescoring(cfg, repo, self.teller.tasks, self.observers)
        self.record = Recorder(repo, ledger, space, self.teller, self.observers)
        self.heldout_failed = self.heldout.failed  # candidate -> why its held-out re-score failed
        self.best_fitness: float | None = None  # kept in memory for the progress line
        self.queue: deque[int] = deque()
        self._unfinished: dict[str, int] = {}  # recipe hash -> candidate being evaluated (or re-queued)
        self._waiting: dict[int, list[tuple[int, int]]] = {}  # that candidate -> (twin id, trial number)

    def _requeue_running(self, give_up_after_max: bool) -> None:
        requeue_running(self.repo, self.ledger, self.study_id, self.teller.values, self.cfg.workers.max_attempts,
                        give_up_after_max)

    def run(self, max_trials: int, timeout_s: float | None, grace_s: float | None = None,
            clock: Callable[[], float] = time.monotonic) -> RunSummary:
        """Search until ``max_trials`` candidates are done (counting earlier runs) or time is up.
        Past ``timeout_s``, work in flight gets ``grace_s`` (default: 30 s or a tenth of the
        timeout, whichever is longer) to finish: a hung worker must not hold the run; what still
        runs then is re-queued for the next run. Both are measured on ``clock`` (seconds; a test
        may start it late, past a start-up whose length depends on the machine's load). A
        SIGINT/SIGTERM stops it at a safe point (search/signals.py), work in flight re-queued."""
        grace = max(30.0, 0.1 * (timeout_s or 0)) if grace_s is None else grace_s
        with signals.deferred():
            return self._run(max_trials, timeout_s, grace, clock)

    def _run(self, max_trials: int, timeout_s: float | None, grace: float, clock: Callable[[], float]) -> RunSummary:
        started = clock()
        deadline = started + timeout_s if timeout_s else math.inf
        counts = {"done": 0, "now": 0}
        with self._leased():
            self._requeue_running(give_up_after_max=True)  # what a dead controller left
            seed_baselines(self.repo, self.study_id, self.cfg, self.space)
            cands = self.repo.candidates(self.study_id)
            self.teller.rebuild(cands)
            self.queue = deque(c.id for c in cands if c.state == State.QUEUED)
            counts["done"] = sum(1 for c in cands if c.state.finished)
            self.best_fitness = max((c.fitness for c in cands if c.fitness is not None), default=None)

            def fill(pool: WorkerPool) -> None:  # in flight: the jobs, and the twins waiting on them
                in_flight = lambda: len(pool.busy_jobs()) + sum(map(len, self._waiting.values()))  # noqa: E731
                while pool.idle() and counts["done"] + in_flight() < max_trials and clock() < deadline \
                        and (self.queue or not self.teller.priors_pending()):
                    counts["done"] += self._dispatch_next()

            def stop(pool: WorkerPool) -> bool:
                if clock() > deadline + min(pool.job_limit(), grace):
                    pool.cancel()
                    return True
                return not pool.busy_jobs() and not (pool.restarting() and counts["done"] < max_trials
                                                     and clock() < deadline)

            def handle(result: TrialResult | Crash) -> None:
                counts["done"] += self._handle(result)
                counts["now"] += 1

            def tick(pool: WorkerPool) -> None:
                self.observers.searching(LoopState(counts["done"], self.best_fitness, pool.active(), len(pool.slots)))

            if counts["done"] < max_trials:
                self._pump(fill, stop, handle, tick)
            self.teller.show()
            self.observers.phase_ended(self.repo.candidates(self.study_id))
        best = self.best()
        return RunSummary(counts["done"], counts["now"], best.id if best else None, best.fitness if best else None,
                          self.pool.utilisation() if self.pool else 0.0, clock() - started)

    def _pump(self, fill: Callable[[WorkerPool], None], stop: Callable[[WorkerPool], bool],
              handle: Callable[[TrialResult | Crash], None], tick: Callable[[WorkerPool], None]) -> None:
        """The one dispatch loop of the search and the held-out re-scoring: fill idle workers,
        stop when ``stop`` says, else hand over what finished within a heartbeat, and beat."""
        if self.pool is None:
            self.pool = self._pool_factory()
            signals.reinstall()  # ray.init took SIGTERM over (its handler aborts the process)
        self.pool.wait_ready()
        while True:
            signals.check()
            fill(self.pool)
            if stop(self.pool):
                return
            for result in self.pool.wait(HEARTBEAT_S):
                handle(result)
            self.lease.heartbeat([j.candidate_id for j in self.pool.busy_jobs() if not j.heldout])
            tick(self.pool)

    @contextmanager
    def _leased(self) -> Iterator[None]:
        """Hold the study's lease; on any stop, settle the work in flight and release it. A
        controller that lost the lease, or the database, writes nothing more (resume reconciles)."""
        self.lease.acquire()
        try:
            yield
        except (LeaseLost, DatabaseUnavailable):
            self.repo.drop_fence()
            raise
        finally:
            if self.repo.holds_lease:
                self._requeue_running(give_up_after_max=False)  # nothing stays RUNNING or open
                self._waiting.clear()
                self._unfinished.clear()
                self.lease.release()

    def _dispatch_next(self) -> int:
        """Start the next candidate; returns how many candidates finished at once (duplicates)."""
        assert self.pool is not None
        if self.queue:
            cand = self.repo.candidate(self.queue.popleft())
        else:
            proposal = self.teller.ask()
            recipe = self.space.decode(proposal.x)
            cid = self.repo.add_candidate(self.study_id, recipe.to_json(), recipe.content_hash,
                                          Origin(self.teller.name), proposal.generation, proposal.x)
            cand = self.repo.candidate(cid)
        recipe = parse_recipe(cand.recipe_json)
        number = self.record.open_trial(cand, recipe)
        attempt = self.repo.start_attempt(cand.id, number, Split.SEARCH)
        # Identical recipes are evaluated once: reuse a finished twin, or wait for a running one.
        twin = self.repo.completed_with_hash(self.study_id, cand.recipe_hash)
        if twin is not None and twin.id != cand.id:
            return self.record.duplicate(cand.id, number, twin)
        running = self._unfinished.get(cand.recipe_hash)
        if running is not None and running != cand.id:
            self._waiting.setdefault(running, []).append((cand.id, number))
            return 0
        reason = self.space.reject(recipe)
        if reason is not None:  # e.g. an empty or too long route: recorded, never evaluated
            self.repo.end_attempt(cand.id, Split.SEARCH, None, f"rejected: {reason}")
            return self.record.fail(cand, number, f"rejected before evaluation: {reason}", None)
        self._unfinished[cand.recipe_hash] = cand.id
        self.pool.submit(Job(cand.id, cand.recipe_json, heldout=False, attempt=attempt, bar=self.teller.bar(cand)))
        return 0

    def _handle(self, result: TrialResult | Crash) -> int:
        """Record one search result; returns how many candidates it finished (with waiting twins)."""
        cand = self.repo.candidate(result.job.candidate_id)
        number = cand.trial_number
        assert number is not None
        if isinstance(result, Crash):
            self.repo.end_attempt(cand.id, Split.SEARCH, result.worker, result.reason, ran=result.ran)
            spent = self.repo.spent_attempts(cand.id, Split.SEARCH)
            if not result.ran or spent < self.cfg.workers.max_attempts:  # a job that never ran spends none
                self.ledger.fail(number, f"{result.reason}; re-queued")
                self.repo.requeue(cand.id, result.reason)
                self.queue.appendleft(cand.id)
                return 0
            return self.record.fail(cand, number, f"{result.reason} (attempt {spent})", None) + self._release(cand)
        outcome = result.outcome
        self.repo.end_attempt(cand.id, Split.SEARCH, result.worker, result.ended)
        if isinstance(outcome, Failed):
            return self.record.fail(cand, number, outcome.reason, result.worker) + self._release(cand)
        try:
            value = fitness(outcome.scores, self.teller.tasks)
        except ScoreError as exc:
            return self.record.fail(cand, number, str(exc), result.worker) + self._release(cand)
        self.record.complete(cand, number, result, outcome.scores, value)
        self.best_fitness = value if self.best_fitness is None else max(self.best_fitness, value)
        return 1 + self._release(cand)

    def _release(self, cand: CandidateRecord) -> int:
        """A finished candidate settles the identical ones that waited for it."""
        self._unfinished.pop(cand.recipe_hash, None)
        twin = self.repo.candidate(cand.id)
        return sum(self.record.duplicate(cid, number, twin) for cid, number in self._waiting.pop(cand.id, []))

    def best(self) -> CandidateRecord | None:
        return best_candidate(self.repo.candidates(self.study_id))

    def rescore_heldout(self) -> int:
        """Score the baselines and the top-k evolved candidates on the held-out split, under
        the study's lease (search/heldout.py); a signal stops it at a safe point."""
        with signals.deferred():
            if not self.heldout.choose(self.repo.candidates(self.study_id)):
                return 0
            with self._leased():
                self._pump(self.heldout.fill, self.heldout.finished, self.heldout.handle, lambda pool: None)
                self.observers.phase_ended(self.repo.candidates(self.study_id))
            return self.heldout.scored

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
