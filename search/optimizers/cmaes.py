"""CMA-ES (pycma), asynchronous, with IPOP restarts and a state rebuilt from stored generations.

pycma (Hansen's ``cma``) runs unbounded here; the search space clips genomes into the unit
box and :class:`CMAOptimizer` adds a quadratic penalty for the distance outside it, so the
optimizer's state is a pure function of the genomes and losses it was told. That is what
makes resume possible without pickles: replaying every stored generation's ``tell``
reproduces the distribution up to floating-point rounding (Hansen, "The CMA Evolution Strategy: A Tutorial",
2016: the update depends only on the ranked samples of each generation).

Asynchrony: proposals are drawn one at a time from the current distribution. A
generation is told as soon as ``popsize`` results have come in, so no worker waits for a
slow candidate. A result whose proposal came from the previous distribution (it was still
running when its generation was told) counts toward the current generation: the
distributions differ by one update, a small bias that asynchronous evolution strategies
commonly accept, and it saves the evaluation. Older results are kept in the ledger only.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from evomerge.search.optimizers.base import Evaluated, Optimizer, OptimizerSettings, Proposal, Update
from evomerge.search.space import box_violation

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pycma warns when matplotlib is absent
    import cma

K = TypeVar("K")
MAX_AGE = 1  # generations a result may lag behind and still be told
BOX_PENALTY = 1.0  # loss per squared unit outside the unit box
MIN_STD = 1e-3  # a run whose largest step is below this (in the unit box) has converged


@dataclass(frozen=True)
class Told(Generic[K]):
    """A generation the distribution was just updated with."""

    index: int
    keys: list[K]
    losses: list[float]


@dataclass
class _Generation(Generic[K]):
    index: int
    results: list[tuple[K, np.ndarray, float]] = field(default_factory=list)


class AsyncCMA(Generic[K]):
    """CMA-ES with one-at-a-time asks and per-generation tells keyed by candidate ids."""

    def __init__(self, x0: Sequence[float], sigma0: float, popsize: int, seed: int, stream: int = 0,
                 diagonal: bool = False, first_generation: int = 0) -> None:
        # The sampling RNG belongs to this object: never numpy's global state, which
        # lm-eval and others reseed. ``stream`` separates the draws of resumed runs.
        self._rng = np.random.default_rng([seed, stream])
        self.popsize = popsize
        self._es = cma.CMAEvolutionStrategy(
            list(x0), sigma0,
            {"popsize": popsize, "seed": seed + 1, "verbose": -9, "randn": self._randn,
             "tolfun": 0, "tolx": 0, "tolstagnation": 10**9, "tolflatfitness": 10**9,
             # pycma mirrors samples for popsize < 6 and injects "selective mirrors" of the
             # worst ones into the next ask; results told out of order (and our tell of
             # stored genomes) orphan those injections. Plain sampling keeps the state a
             # function of the told generations alone.
             "CMA_mirrors": 0,
             # separable CMA-ES (Ros & Hansen 2008): a diagonal covariance for large genomes
             "CMA_diagonal": diagonal})
        self.first_generation = first_generation
        self._current: _Generation[K] = _Generation(first_generation)
        self._batch: list[np.ndarray] = []

    def _randn(self, *shape: int) -> np.ndarray:
        return self._rng.standard_normal(shape)

    @property
    def generation(self) -> int:
        return self._current.index

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self._es.mean)

    @property
    def sigma(self) -> float:
        return float(self._es.sigma)

    @property
    def max_std(self) -> float:
        """The largest standard deviation of the sampling distribution, over all genes."""
        return float(np.max(self._es.stds))

    def ask(self) -> Proposal:
        """One genome from the current distribution."""
        if not self._batch:
            # Sample from a copy: pycma's ask changes state that its next tell reads, and a
            # replay (one ask per tell) must reach the same state however often a live
            # generation asked. The copy shares our sampling RNG (the ``randn`` option).
            self._batch = [np.asarray(x) for x in copy.deepcopy(self._es, {id(self): self}).ask()]
        return Proposal(tuple(float(v) for v in self._batch.pop(0)), self._current.index)

    def tell(self, generation: int, key: K, x: Sequence[float], loss: float) -> Told[K] | None:
        """Record a result (lower is better; ``inf`` for a failure) of a proposal of ``generation``.

        Returns the generation just told (its index and keys, in order) when this result
        completes it; results more than ``MAX_AGE`` generations old are ignored.
        """
        if generation < self.first_generation or not 0 <= self._current.index - generation <= MAX_AGE:
            return None
        self._current.results.append((key, np.asarray(x, dtype=float), loss))
        if len(self._current.results) < self.popsize:
            return None
        told = self._current.results[: self.popsize]
        self._update([x for _, x, _ in told], [f for _, _, f in told])
        index = self._current.index
        self._current, self._batch = _Generation(index + 1), []
        return Told(index, [k for k, _, _ in told], [f for _, _, f in told])

    def replay(self, genomes: Sequence[Sequence[float]], losses: Sequence[float]) -> None:
        """Re-apply a stored generation's update (resume)."""
        if len(genomes) != self.popsize:
            raise ValueError(f"stored generation has {len(genomes)} results, popsize is {self.popsize}")
        self._update([np.asarray(x, dtype=float) for x in genomes], list(losses))
        self._current, self._batch = _Generation(self._current.index + 1), []

    def _update(self, xs: list[np.ndarray], losses: list[float]) -> None:
        # CMA-ES uses ranks only (Hansen 2016, §3): tell pycma each result's rank, ties and
        # failures (inf: last) broken by the order they were told. pycma breaks exact ties
        # with its own randomness, which a replay would not reproduce.
        order = sorted(range(len(losses)), key=lambda i: (losses[i], i))
        ranks = [0.0] * len(losses)
        for rank, i in enumerate(order):
            ranks[i] = float(rank)
        self._es.ask()  # pycma refuses two tells without an ask in between; samples unused
        self._es.tell(xs, ranks)


def stagnation_patience(dim: int, popsize: int) -> int:
    """Generations without improvement after which a run has stagnated.

    pycma's ``tolstagnation`` (100 + 100·n^1.5/λ generations) suits budgets of 10^4+
    evaluations; a merge search spends hundreds, so we use a tenth of it, at least 10.
    """
    return max(10, math.ceil(10 + 10 * dim**1.5 / popsize))


class CMAOptimizer(Optimizer):
    """CMA-ES with IPOP restarts (Auger & Hansen, "A Restart CMA Evolution Strategy With
    Increasing Population Size", CEC 2005): when a run stagnates or converges, a new run
    starts from a uniformly random point of the box with twice the population.

    The first run starts at the best *prior* (a baseline of the space, such as the untuned
    merge) when there is one, else at the configured start; restart points are drawn from
    a generator seeded by the restart's number, so restarts replay identically on resume.
    Losses are ``-value`` plus a quadratic penalty outside the unit box, which keeps pycma
    unbounded and its state a pure function of the told genomes and losses.
    """

    name = "cma"

    def __init__(self, settings: OptimizerSettings) -> None:
        super().__init__(settings)
        self._prior: tuple[float, tuple[float, ...]] | None = None  # best (loss, x) among the priors
        self._es: AsyncCMA[int] | None = None
        self.restarts = 0
        self._best_loss = math.inf  # of the current run
        self._best_at = 0  # generation that set it

    # -- state -------------------------------------------------------------------------------

    def _loss(self, result: Evaluated) -> float:
        base = -result.values[0] if result.values is not None else math.inf
        return base + BOX_PENALTY * box_violation(result.x)

    def _run(self) -> AsyncCMA[int]:
        if self._es is None:
            start = self._prior[1] if self._prior is not None else self.settings.x0
            self._es = self._new_run(start, self.settings.popsize, 0)
        return self._es

    def _new_run(self, x0: Sequence[float], popsize: int, first_generation: int) -> AsyncCMA[int]:
        s = self.settings
        self._best_loss, self._best_at = math.inf, first_generation
        return AsyncCMA(x0, s.sigma0, popsize, s.seed + 1000 * self.restarts, stream=s.stream,
                        diagonal=s.diagonal, first_generation=first_generation)

    def _after_update(self, told_index: int, losses: Sequence[float]) -> None:
        """Track the run's progress; restart it when it stagnated or converged."""
        es = self._run()
        best = min(losses)
        if best < self._best_loss - 1e-12:
            self._best_loss, self._best_at = best, told_index
        stagnated = told_index - self._best_at >= stagnation_patience(self.settings.dim, es.popsize)
        if (stagnated or es.max_std < MIN_STD) and self.restarts < self.settings.restarts:
            self.restarts += 1
            rng = np.random.default_rng([self.settings.seed, 7919, self.restarts])
            self._es = self._new_run(rng.uniform(0.0, 1.0, self.settings.dim), es.popsize * 2, told_index + 1)

    # -- the interface -----------------------------------------------------------------------

    def ask(self) -> Proposal:
        return self._run().ask()

    def tell(self, result: Evaluated) -> Update | None:
        loss = self._loss(result)
        if result.prior:
            if self._es is None and math.isfinite(loss) and (self._prior is None or loss < self._prior[0]):
                self._prior = (loss, result.x)
            return None
        if result.generation is None:
            return None
        told = self._run().tell(result.generation, result.key, result.x, loss)
        if told is None:
            return None
        self._after_update(told.index, told.losses)
        return Update(told.index, tuple(told.keys))

    def restore(self, updates: Sequence[Sequence[Evaluated]], rest: Sequence[Evaluated]) -> None:
        for result in rest:
            if result.prior:
                self.tell(result)
        for batch in updates:
            es = self._run()
            losses = [self._loss(r) for r in batch]
            index = es.generation
            es.replay([r.x for r in batch], losses)
            self._after_update(index, losses)
        # Results that finished before the stop but were not yet told count again.
        for result in rest:
            if not result.prior:
                self.tell(result)

    def describe(self) -> str:
        # A read: it must not start the run (the controller shows the optimizer before the
        # baselines it waits for are told; starting here would ignore them as priors).
        if self._es is None:
            start = "the best prior" if self._prior is not None else "the configured start"
            return (f"cma (IPOP restarts 0/{self.settings.restarts}, popsize {self.settings.popsize}, "
                    f"not started: will start at {start})")
        es = self._es
        return (f"cma (IPOP restarts {self.restarts}/{self.settings.restarts}, popsize {es.popsize}, "
                f"generation {es.generation}, step {es.max_std:.3g})")
