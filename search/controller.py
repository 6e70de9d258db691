"""The controller: proposes candidates, keeps every worker busy, persists, resumes.

One controller drives a study at a time (a lease in the database). Everything it learns
is written before it acts on it, so ``kill -9`` at any point loses at most the work in
flight: on the next start, RUNNING trials are failed in Optuna, their candidates
re-queued (attempt counted), and the optimizer rebuilt from the stored outcomes (its
:meth:`~search.optimizers.Optimizer.restore`). A resumed search is therefore consistent
but not bit-identical to an uninterrupted one: proposals after the resume come from a
fresh random stream.

The controller names no optimizer: it asks the one the config names for genomes, tells it
every outcome (baselines that lie in the search space first, as priors), and stores the
updates it reports. What it reports (progress, finished candidates, held-out scores, the end
of a phase) goes to the observers it is given (search/observers.py): it builds none itself.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from evomerge.evaluators.fitness import ScoreError, fitness
from evomerge.search.optimizers import Evaluated, Optimizer, OptimizerSettings, build_optimizer
from evomerge.search.optimizers.base import default_popsize
from evomerge.evaluators.racing import generation_bar
from evomerge.search.config import SearchConfig
from evomerge.search.ledger import Ledger
from evomerge.search.observers import LoopState, Observers, SearchObserver
from evomerge.search.ranking import best_candidate
from evomerge.search import signals
from evomerge.search.dfs_space import RouteSpace
from evomerge.search.space import SearchSpace
from evomerge.search.origins import evolved
from evomerge.storage.kinds import Origin, Split, State
from evomerge.storage.repository import CandidateRecord, LeaseLost, Repository
from evomerge.storage.retry import DatabaseUnavailable
from evomerge.workers.pool import NOT_RUN, Crash, WorkerPool
from evomerge.workers.recipe import MergeRecipe, Recipe, SourceRecipe, parse_recipe
from evomerge.workers.result import Failed, Job, Scored, TrialResult

LEASE_S = 120.0
HEARTBEAT_S = 5.0


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


def _owner_alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True  # cannot tell from here: the lease's expiry decides
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


Space = SearchSpace | RouteSpace


def baseline_recipes(cfg: SearchConfig, space: Space) -> list[tuple[Origin, Recipe]]:
    """PS: the sources themselves, a uniform soup, and the search's method at its initial genes.
    DFS: the collection's models as they are (merged members as merges) and model A as a route."""
    if isinstance(space, RouteSpace):
        members = dict(space.members)
        out = [(Origin.SOURCE, members[m].model_copy(update={"label": f"PS model {m}"}) if m in members
                else SourceRecipe(source=m, label=f"source {m}")) for m in space.models]
        return out + [(Origin.UNTUNED, space.identity(label=f"model {space.models[0]} as a route"))]
    out: list[tuple[Origin, Recipe]] = [(Origin.SOURCE, SourceRecipe(source=m.name, label=f"source {m.name}"))
                                        for m in cfg.models]
    experts = cfg.experts
    out.append((Origin.UNTUNED, MergeRecipe(method="linear", base=cfg.base_model, models=experts,
                                           params={"weight": {m: (round(1 / len(experts), 6),) for m in experts}},
                                           normalize=False, label="untuned soup")))
    initial = [cfg.optimizer.init] * space.dim
    out.append((Origin.UNTUNED, space.decode(initial, label=f"untuned {space.method}")))
    if cfg.optimizer.start == "best_baseline" and len(experts) >= 3:
        # Leave-one-out probes: an expert that hurts the merge (Sakana's distraction
        # ablation) shows at once, and the optimizer starts from the merge without it.
        out += [(Origin.UNTUNED, space.decode(x, label=f"untuned {space.method} without {name}"))
                for name, x in space.leave_one_out(initial)]
    return out


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
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.popsize = cfg.optimizer.popsize or default_popsize(space.dim)
        self.tasks = cfg.suite().tasks
        self.best_fitness: float | None = None  # kept in memory for the progress line
        self.queue: deque[int] = deque()
        self.optimizer: Optimizer | None = None
        # Baselines that lie in the search space are told to the optimizer first, as priors:
        # with start "best_baseline" it waits for them before its first proposal.
        self.use_priors = cfg.optimizer.start == "best_baseline"
        self._priors_told = False
        self._unfinished: dict[str, int] = {}  # recipe hash -> candidate being evaluated (or re-queued)
        self._waiting: dict[int, list[tuple[int, int]]] = {}  # that candidate -> (twin id, trial number)
        self.heldout_failed: dict[int, str] = {}  # candidate -> why its held-out re-score failed
        self._heldout_retry: list[int] = []
        self._beat = 0.0
        self.observers = Observers(observers)

    # --- setup and recovery ----------------------------------------------------------

    def _recover(self) -> None:
        """Account for what a dead controller left: fail its trials, re-queue its candidates."""
        self._requeue_running(give_up_after_max=True)

    def _requeue_running(self, give_up_after_max: bool) -> None:
        """Fail every RUNNING trial and put every running candidate back in the queue.

        The database, not the pool, says what is running: a result already taken from a
        worker but not yet recorded is re-queued too. ``give_up_after_max`` fails
        candidates whose attempts are spent (a candidate that keeps killing controllers).
        """
        by_trial = {c.trial_number: c for c in self.repo.candidates(self.study_id) if c.trial_number is not None}
        self.ledger.settle_running(lambda number: self._verdict(by_trial.get(number)))
        self.repo.end_open_attempts(self.study_id, Split.HELDOUT, "abandoned: controller stopped")
        for cand in self.repo.candidates(self.study_id):
            if cand.state != State.RUNNING:
                continue
            self.repo.end_attempt(cand.id, Split.SEARCH, cand.worker, "abandoned: controller stopped")
            spent = self._spent_attempts(cand.id, Split.SEARCH)
            if give_up_after_max and spent >= self.cfg.workers.max_attempts:
                self.repo.fail(cand.id, f"abandoned after {spent} attempts")
            else:
                self.repo.requeue(cand.id, "controller stopped during evaluation")

    def _verdict(self, cand: CandidateRecord | None) -> Sequence[float] | str:
        """What a RUNNING trial becomes: our candidate row is the truth (it is written first)."""
        values = self._values(cand) if cand is not None else None
        if values is not None:
            return values
        if cand is not None and cand.state == State.FAILED:
            return cand.error or "failed"
        return "controller stopped while this trial ran; its candidate was re-queued"

    def _seed_baselines(self) -> None:
        if self.repo.candidates(self.study_id):
            return
        for origin, recipe in baseline_recipes(self.cfg, self.space):
            self.repo.add_candidate(self.study_id, recipe.to_json(), recipe.content_hash, origin)

    def _rebuild_optimizer(self, cands: list[CandidateRecord]) -> None:
        """The configured optimizer from scratch, then restored from the stored outcomes."""
        o = self.cfg.optimizer
        diagonal = isinstance(self.space, RouteSpace) if o.diagonal is None else o.diagonal
        settings = OptimizerSettings(
            dim=self.space.dim, objectives=len(self.tasks), seed=o.seed, popsize=self.popsize, sigma0=o.sigma0,
            x0=tuple(self.space.initial(o.init)), diagonal=diagonal, restarts=o.restarts,
            stream=sum(1 for c in cands if evolved(c)))
        self.optimizer = build_optimizer(o.name, settings)
        by_id = {c.id: c for c in cands}
        updates = [[self._evaluated(by_id[i]) for i in ids] for ids in self.repo.generations(self.study_id)]
        told = {r.key for batch in updates for r in batch}
        finished = [c for c in cands if c.state.finished and c.id not in told]
        rest = [self._evaluated(c) for c in finished if self._prior(c)]
        rest += [self._evaluated(c) for c in finished if evolved(c) and c.genes is not None]
        self.optimizer.restore(updates, rest)
        self._show_optimizer()

    def _show_optimizer(self) -> None:
        """The optimizer's state in one line, as a study attribute that optuna-dashboard shows."""
        assert self.optimizer is not None
        self.ledger.study.set_user_attr("optimizer", self.optimizer.describe())

    def _prior(self, cand: CandidateRecord) -> bool:
        """A baseline whose recipe lies in the search space: told to the optimizer as a prior."""
        return self.use_priors and not evolved(cand) and cand.duplicate_of is None \
            and self.space.genome_of(parse_recipe(cand.recipe_json)) is not None

    def _values(self, cand: CandidateRecord) -> tuple[float, ...] | None:
        """What the study maximizes: the fitness, or each task's score (multi-objective)."""
        if cand.state != State.COMPLETE or cand.fitness is None:
            return None
        if self.ledger.multi_objective:
            scores = cand.scores or {}
            return tuple(float(scores[t.name]) for t in self.tasks)
        return (cand.fitness,)

    def _evaluated(self, cand: CandidateRecord) -> Evaluated:
        if evolved(cand):
            return Evaluated(cand.id, tuple(cand.genes or ()), self._values(cand), cand.generation)
        x = self.space.genome_of(parse_recipe(cand.recipe_json))
        assert x is not None, "only baselines of the space are told"
        return Evaluated(cand.id, x, self._values(cand), prior=True)

    def _tell(self, cand: CandidateRecord) -> None:
        """Tell the optimizer a finished candidate (an evolved one, or a prior), and the observers."""
        assert self.optimizer is not None
        self.observers.finished(cand)
        if not (evolved(cand) or self._prior(cand)):
            return
        update = self.optimizer.tell(self._evaluated(cand))
        if update is not None:  # stored under the optimizer's index: a late result joins a later one
            self.repo.add_generation(self.study_id, update.index, list(update.keys))

    def _priors_pending(self) -> bool:
        """Baselines still being evaluated, which the optimizer should hear of before it proposes."""
        if self.use_priors and not self._priors_told:
            self._priors_told = not any(not evolved(c) and c.state in (State.QUEUED, State.RUNNING)
                                        for c in self.repo.candidates(self.study_id))
        return self.use_priors and not self._priors_told

    # --- the loop --------------------------------------------------------------------

    def run(self, max_trials: int, timeout_s: float | None) -> RunSummary:
        """Search until ``max_trials`` candidates are done (counting earlier runs) or time is up.
        A SIGINT/SIGTERM stops it at a safe point (search/signals.py), work in flight re-queued."""
        with signals.deferred():
            return self._run(max_trials, timeout_s)

    def _run(self, max_trials: int, timeout_s: float | None) -> RunSummary:
        started = time.monotonic()
        deadline = started + timeout_s if timeout_s else math.inf
        evaluated_now = 0
        with self._leased():
            self._recover()
            self._seed_baselines()
            cands = self.repo.candidates(self.study_id)
            self._rebuild_optimizer(cands)
            self.queue = deque(c.id for c in cands if c.state == State.QUEUED)
            done = sum(1 for c in cands if c.state.finished)
            self.best_fitness = max((c.fitness for c in cands if c.fitness is not None), default=None)
            if done < max_trials:
                self._start_pool()
            while self.pool is not None:
                signals.check()
                while self.pool.idle() and done + self._in_flight() < max_trials \
                        and time.monotonic() < deadline and (self.queue or not self._priors_pending()):
                    done += self._dispatch_next()
                if not self.pool.busy_jobs() and not (self.pool.restarting() and done < max_trials
                                                      and time.monotonic() < deadline):
                    break
                # Past the deadline, work in flight gets a bounded grace (a hung worker must not
                # hold the run); what is still running then is re-queued for the next run.
                if time.monotonic() > deadline + min(self.pool.job_limit(), max(30.0, 0.1 * (timeout_s or 0))):
                    self.pool.cancel()
                    break
                for result in self.pool.wait(HEARTBEAT_S):
                    finished = self._handle(result)
                    done += finished
                    evaluated_now += 1
                self._heartbeat()
                self.observers.searching(LoopState(done, self.best_fitness, self.pool.active(), len(self.pool.slots)))
            self._show_optimizer()
            self.observers.phase_ended(self.repo.candidates(self.study_id))
        best = self.best()
        return RunSummary(done, evaluated_now, best.id if best else None, best.fitness if best else None,
                          self.pool.utilisation() if self.pool else 0.0, time.monotonic() - started)

    @contextmanager
    def _leased(self) -> Iterator[None]:
        """Hold the study's lease; on any stop, settle the work in flight and release it. A
        controller that lost the lease, or the database, writes nothing more (resume reconciles)."""
        self.repo.acquire_lease(self.study_id, self.owner, LEASE_S, _owner_alive)
        try:
            yield
        except (LeaseLost, DatabaseUnavailable):
            self.repo.drop_fence()
            raise
        finally:
            if self.repo.holds_lease:
                self._abandon_in_flight()
                self.repo.release_lease(self.study_id, self.owner)

    def _start_pool(self) -> None:
        if self.pool is None:
            self.pool = self._pool_factory()
            signals.reinstall()  # ray.init took SIGTERM over (its handler aborts the process)
        self.pool.wait_ready()

    def _in_flight(self) -> int:
        assert self.pool is not None
        return len(self.pool.busy_jobs()) + sum(len(w) for w in self._waiting.values())

    def _dispatch_next(self) -> int:
        """Start the next candidate; returns how many candidates finished at once (duplicates)."""
        assert self.pool is not None and self.optimizer is not None
        if self.queue:
            cand = self.repo.candidate(self.queue.popleft())
        else:
            proposal = self.optimizer.ask()
            recipe = self.space.decode(proposal.x)
            cid = self.repo.add_candidate(self.study_id, recipe.to_json(), recipe.content_hash,
                                          Origin(self.optimizer.name), proposal.generation, proposal.x)
            cand = self.repo.candidate(cid)
        number = self._open_trial(cand)
        attempt = self.repo.start_attempt(cand.id, number, Split.SEARCH)
        # Identical recipes are evaluated once: reuse a finished twin, or wait for a running one.
        twin = self.repo.completed_with_hash(self.study_id, cand.recipe_hash)
        if twin is not None and twin.id != cand.id:
            return self._finish_duplicate(cand.id, number, twin)
        running = self._unfinished.get(cand.recipe_hash)
        if running is not None and running != cand.id:
            self._waiting.setdefault(running, []).append((cand.id, number))
            return 0
        reason = self.space.reject(parse_recipe(cand.recipe_json))
        if reason is not None:  # e.g. an empty or too long route: recorded, never evaluated
            self.repo.end_attempt(cand.id, Split.SEARCH, None, f"rejected: {reason}")
            return self._fail(cand, number, f"rejected before evaluation: {reason}", None)
        self._unfinished[cand.recipe_hash] = cand.id
        self.pool.submit(Job(cand.id, cand.recipe_json, heldout=False, attempt=attempt, bar=self._bar(cand)))
        return 0

    def _finish_duplicate(self, cid: int, number: int, twin: CandidateRecord) -> int:
        self.repo.end_attempt(cid, Split.SEARCH, None, f"duplicate of candidate {twin.id}")
        if twin.state != State.COMPLETE or twin.fitness is None:
            return self._fail(self.repo.candidate(cid), number, f"duplicate of failed candidate {twin.id}", None)
        self.repo.complete(cid, twin.scores or {}, twin.fitness, None, 0.0, 0.0, twin.id, twin.documents,
                           twin.raced_out, evaluate_cpu_s=0.0)
        cand = self.repo.candidate(cid)
        self.ledger.complete(number, self._values(cand) or (twin.fitness,), {"duplicate_of": twin.id})
        self._tell(cand)
        return 1

    def _open_trial(self, cand: CandidateRecord) -> int:
        recipe = parse_recipe(cand.recipe_json)
        params: dict[str, float] = {}
        bounds: dict[str, tuple[float, float]] = {}
        if evolved(cand) or self.space.belongs(recipe):
            params = self.space.params_of(recipe)
            bounds = self.space.bounds()
        attrs = {"candidate_id": cand.id, "origin": cand.origin, "recipe": recipe.summary(),
                 "recipe_hash": cand.recipe_hash, "generation": cand.generation, "attempt": cand.attempt + 1}
        self.repo.check_lease()  # Optuna's write comes before ours here: a fenced controller must not make it
        return self.ledger.open_trial(params, bounds, attrs)

    def _handle(self, result: TrialResult | Crash) -> int:
        """Record one search result; returns how many candidates it finished (with waiting twins)."""
        cand = self.repo.candidate(result.job.candidate_id)
        number = cand.trial_number
        assert number is not None
        if isinstance(result, Crash):
            self.repo.end_attempt(cand.id, Split.SEARCH, result.worker, result.reason)
            spent = self._spent_attempts(cand.id, Split.SEARCH)
            if not result.ran or spent < self.cfg.workers.max_attempts:  # a job that never ran spends none
                self.ledger.fail(number, f"{result.reason}; re-queued")
                self.repo.requeue(cand.id, result.reason)
                self.queue.appendleft(cand.id)
                return 0
            return self._fail(cand, number, f"{result.reason} (attempt {spent})", None) + self._release(cand)
        self.repo.end_attempt(cand.id, Split.SEARCH, result.worker,
                              "ok" if isinstance(result.outcome, Scored) else result.outcome.reason)
        if isinstance(result.outcome, Failed):
            return self._fail(cand, number, result.outcome.reason, result.worker) + self._release(cand)
        try:
            value = fitness(result.outcome.scores, self.tasks)
        except ScoreError as exc:
            return self._fail(cand, number, str(exc), result.worker) + self._release(cand)
        self.repo.complete(cand.id, result.outcome.scores, value, result.worker, result.materialize_s,
                           result.evaluate_s, documents=result.documents, raced_out=not result.complete,
                           evaluate_cpu_s=result.evaluate_cpu_s)
        cand = self.repo.candidate(cand.id)
        self.best_fitness = value if self.best_fitness is None else max(self.best_fitness, value)
        # One attribute per task score, so the dashboard's trial table shows them as columns.
        self.ledger.complete(number, self._values(cand) or (value,), {
            **{f"score.{task}": score for task, score in result.outcome.scores.items()},
            "worker": result.worker, "documents": result.documents, "raced_out": not result.complete,
            "seconds": {"materialize": round(result.materialize_s, 4), "evaluate": round(result.evaluate_s, 4),
                        "evaluate_cpu": round(result.evaluate_cpu_s, 4)}})
        self._tell(cand)
        return 1 + self._release(cand)

    def _bar(self, cand: CandidateRecord) -> float | None:
        """Racing: the fitness an evolved candidate must be able to reach to be worth scoring
        in full (evaluators/racing.py), from the last finished candidates, the baselines
        among them (so the first generation is raced against the sources and untuned merges);
        None (score in full) for baselines, for multi-objective searches and while racing is off."""
        if not self.cfg.evaluation.racing.enabled or not evolved(cand) or self.ledger.multi_objective:
            return None
        finished = self.repo.recent_fitnesses(self.study_id, self.popsize)
        return generation_bar(finished, self.popsize, self.cfg.evaluation.racing.keep)

    def _spent_attempts(self, cid: int, split: Split) -> int:
        """Attempts on ``split`` whose job ran (or may have): one that never started is free."""
        return sum(1 for a in self.repo.attempts(cid)
                   if a.split == split and not (a.outcome or "").startswith(NOT_RUN))

    def _release(self, cand: CandidateRecord) -> int:
        """A finished candidate settles the identical ones that waited for it."""
        self._unfinished.pop(cand.recipe_hash, None)
        twin = self.repo.candidate(cand.id)
        return sum(self._finish_duplicate(cid, number, twin) for cid, number in self._waiting.pop(cand.id, []))

    def _fail(self, cand: CandidateRecord, number: int, reason: str, worker: str | None) -> int:
        self.repo.fail(cand.id, reason, worker)
        self.ledger.fail(number, reason)
        self._tell(self.repo.candidate(cand.id))
        return 1

    def _heartbeat(self) -> None:
        if self.repo.clock.now() - self._beat < HEARTBEAT_S:
            return
        self._beat = self.repo.clock.now()
        self.repo.renew_lease(self.study_id, self.owner, LEASE_S)
        if self.pool is not None:
            self.repo.touch([j.candidate_id for j in self.pool.busy_jobs() if not j.heldout])

    def _abandon_in_flight(self) -> None:
        """On an orderly stop (signal, error): nothing stays RUNNING, no attempt stays open."""
        self._requeue_running(give_up_after_max=False)
        self._waiting.clear()
        self._unfinished.clear()

    # --- results -----------------------------------------------------------------------

    def best(self) -> CandidateRecord | None:
        return best_candidate(self.repo.candidates(self.study_id))

    def rescore_heldout(self) -> int:
        """Score the baselines and the top-k evolved candidates on the held-out split, under
        the study's lease; a signal stops it at a safe point."""
        with signals.deferred():
            return self._rescore_heldout()

    def _rescore_heldout(self) -> int:
        if self.cfg.evaluation.heldout_split is None:
            return 0
        cands = [c for c in self.repo.candidates(self.study_id) if c.state == State.COMPLETE and c.duplicate_of is None]
        leaders = sorted((c for c in cands if evolved(c)), key=lambda c: -(c.fitness or 0.0))
        chosen = [c for c in cands if not evolved(c)] + leaders[: self.cfg.evaluation.heldout_top_k]
        todo = deque(c for c in chosen if c.heldout is None)
        if not todo:
            return 0
        scored = 0
        with self._leased():
            self._start_pool()
            assert self.pool is not None
            while todo or self.pool.busy_jobs():
                signals.check()
                while todo and self.pool.idle():
                    cand = todo.popleft()
                    self.repo.start_attempt(cand.id, None, Split.HELDOUT)
                    self.pool.submit(Job(cand.id, cand.recipe_json, heldout=True))
                for result in self.pool.wait(HEARTBEAT_S):
                    scored += self._handle_heldout(result)
                todo.extend(self.repo.candidate(cid) for cid in self._heldout_retry)
                self._heldout_retry.clear()
                self._heartbeat()
            self.observers.phase_ended(self.repo.candidates(self.study_id))
        return scored

    def _handle_heldout(self, result: TrialResult | Crash) -> int:
        cid = result.job.candidate_id
        outcome = result.reason if isinstance(result, Crash) else (
            "ok" if isinstance(result.outcome, Scored) else result.outcome.reason)
        self.repo.end_attempt(cid, Split.HELDOUT, result.worker, outcome)
        if isinstance(result, Crash):
            if not result.ran or self._spent_attempts(cid, Split.HELDOUT) < self.cfg.workers.max_attempts:
                self._heldout_retry.append(cid)
                return 0
            self.heldout_failed[cid] = result.reason
            return 0
        if not isinstance(result.outcome, Scored):
            self.heldout_failed[cid] = result.outcome.reason
            return 0
        try:
            value = fitness(result.outcome.scores, self.tasks)
        except ScoreError as exc:
            self.heldout_failed[cid] = str(exc)
            return 0
        self.heldout_failed.pop(cid, None)
        self.repo.set_heldout(cid, result.outcome.scores, value)
        self.observers.heldout_scored(self.repo.candidate(cid))
        return 1

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

