"""The optimizer as the controller drives it: rebuilt from the stored outcomes, asked for
genomes, told every finished candidate, its generations stored.

Baselines that lie in the search space are told first, as priors: with ``optimizer.start:
best_baseline`` the optimizer waits for them before its first proposal. The teller keeps the
baselines still being evaluated in memory (from one read of the candidates when it is
rebuilt), so asking whether priors are pending reads nothing.
"""

from __future__ import annotations

from evomerge.evaluators.racing import generation_bar
from evomerge.evaluators.spec import TaskSpec
from evomerge.search.config import SearchConfig
from evomerge.search.ledger import Ledger
from evomerge.search.optimizers import Evaluated, Optimizer, OptimizerSettings, Proposal, build_optimizer
from evomerge.search.origins import evolved
from evomerge.search.spaces import Space
from evomerge.storage.kinds import State
from evomerge.storage.repository import CandidateRecord, Repository
from evomerge.workers.recipe import parse_recipe


class Teller:
    """One study's optimizer and what it has been told."""

    def __init__(self, cfg: SearchConfig, repo: Repository, ledger: Ledger, space: Space, study_id: int,
                 popsize: int) -> None:
        self.cfg, self.repo, self.ledger, self.space, self.study_id = cfg, repo, ledger, space, study_id
        self.popsize = popsize
        self.tasks: tuple[TaskSpec, ...] = cfg.suite().tasks
        self.use_priors = cfg.optimizer.start == "best_baseline"
        self.optimizer: Optimizer | None = None
        self._pending_priors: set[int] = set()  # baselines queued or running: heard of before a proposal

    @property
    def name(self) -> str:
        assert self.optimizer is not None
        return self.optimizer.origin

    def rebuild(self, cands: list[CandidateRecord]) -> None:
        """The configured optimizer from scratch, then restored from the stored outcomes."""
        o = self.cfg.optimizer
        settings = OptimizerSettings(
            dim=self.space.dim, objectives=len(self.tasks), seed=o.seed, popsize=self.popsize, sigma0=o.sigma0,
            x0=tuple(self.space.initial(o.init)), diagonal=self.space.diagonal if o.diagonal is None else o.diagonal,
            restarts=o.restarts, stream=sum(1 for c in cands if evolved(c)),
            arms=self.space.arms(o.popsize, o.init))
        self.optimizer = build_optimizer(o.name, settings)
        by_id = {c.id: c for c in cands}
        updates = [[self._evaluated(by_id[i]) for i in ids] for ids in self.repo.generations(self.study_id)]
        told = {r.key for batch in updates for r in batch}
        finished = [c for c in cands if c.state.finished and c.id not in told]
        rest = [self._evaluated(c) for c in finished if self._prior(c)]
        rest += [self._evaluated(c) for c in finished if evolved(c) and c.genes is not None]
        self.optimizer.restore(updates, rest)
        self._pending_priors = ({c.id for c in cands if not evolved(c) and c.state in (State.QUEUED, State.RUNNING)}
                                if self.use_priors else set())
        self.show()

    def show(self) -> None:
        """The optimizer's state in one line, as a study attribute that optuna-dashboard shows."""
        assert self.optimizer is not None
        line = self.optimizer.describe()
        self.ledger.retried(lambda: self.ledger.study.set_user_attr("optimizer", line))

    def ask(self) -> Proposal:
        assert self.optimizer is not None
        return self.optimizer.ask()

    def priors_pending(self) -> bool:
        """Baselines still being evaluated, which the optimizer should hear of before it proposes."""
        return bool(self._pending_priors)

    def values(self, cand: CandidateRecord) -> tuple[float, ...] | None:
        """What the study maximizes: the fitness, or each task's score (multi-objective)."""
        if cand.state != State.COMPLETE or cand.fitness is None:
            return None
        if self.ledger.multi_objective:
            scores = cand.scores or {}
            return tuple(float(scores[t.name]) for t in self.tasks)
        return (cand.fitness,)

    def tell(self, cand: CandidateRecord) -> None:
        """Tell the optimizer a finished candidate (an evolved one, or a prior)."""
        assert self.optimizer is not None
        self._pending_priors.discard(cand.id)
        if not (evolved(cand) or self._prior(cand)):
            return
        update = self.optimizer.tell(self._evaluated(cand))
        if update is not None:  # stored under the optimizer's index: a late result joins a later one
            self.repo.add_generation(self.study_id, update.index, list(update.keys))
            self.show()  # the dashboard's line follows the generations (method auto: the budget per family)

    def bar(self, cand: CandidateRecord) -> float | None:
        """Racing: the fitness an evolved candidate must be able to reach to be worth scoring
        in full (evaluators/racing.py), from the last finished candidates, the baselines
        among them (so the first generation is raced against the sources and untuned merges);
        None (score in full) for baselines, for multi-objective searches and while racing is off."""
        racing = self.cfg.evaluation.racing
        if not racing.enabled or not evolved(cand) or self.ledger.multi_objective:
            return None
        return generation_bar(self.repo.recent_fitnesses(self.study_id, self.popsize), self.popsize, racing.keep)

    def _prior(self, cand: CandidateRecord) -> bool:
        """A baseline whose recipe lies in the search space: told to the optimizer as a prior."""
        return self.use_priors and not evolved(cand) and cand.duplicate_of is None \
            and self.space.genome_of(parse_recipe(cand.recipe_json)) is not None

    def _evaluated(self, cand: CandidateRecord) -> Evaluated:
        if evolved(cand):
            return Evaluated(cand.id, tuple(cand.genes or ()), self.values(cand), cand.generation,
                             documents=cand.documents)
        x = self.space.genome_of(parse_recipe(cand.recipe_json))
        assert x is not None, "only baselines of the space are told"
        return Evaluated(cand.id, x, self.values(cand), prior=True, documents=cand.documents)
