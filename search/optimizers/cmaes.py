"""Asynchronous CMA-ES over pycma, with a state rebuilt from stored generations.

pycma (Hansen's ``cma``) runs unbounded here; the search space clips genomes into the unit
box and the controller adds a quadratic penalty for the distance outside it, so the
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

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pycma warns when matplotlib is absent
    import cma

K = TypeVar("K")
MAX_AGE = 1  # generations a result may lag behind and still be told


def default_popsize(dim: int) -> int:
    """4 + ⌊3 ln n⌋, pycma's and the paper's default."""
    return 4 + int(3 * math.log(dim))


@dataclass(frozen=True)
class Proposal:
    generation: int
    x: tuple[float, ...]


@dataclass(frozen=True)
class Told(Generic[K]):
    """A generation the distribution was just updated with."""

    index: int
    keys: list[K]


@dataclass
class _Generation(Generic[K]):
    index: int
    results: list[tuple[K, np.ndarray, float]] = field(default_factory=list)


class AsyncCMA(Generic[K]):
    """CMA-ES with one-at-a-time asks and per-generation tells keyed by candidate ids."""

    def __init__(self, x0: Sequence[float], sigma0: float, popsize: int, seed: int, stream: int = 0,
                 diagonal: bool = False) -> None:
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
        self._current: _Generation[K] = _Generation(0)
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

    def ask(self) -> Proposal:
        """One genome from the current distribution."""
        if not self._batch:
            self._batch = [np.asarray(x) for x in self._es.ask()]
        return Proposal(self._current.index, tuple(float(v) for v in self._batch.pop(0)))

    def tell(self, generation: int, key: K, x: Sequence[float], loss: float) -> Told[K] | None:
        """Record a result (lower is better; ``inf`` for a failure) of a proposal of ``generation``.

        Returns the generation just told (its index and keys, in order) when this result
        completes it; results more than ``MAX_AGE`` generations old are ignored.
        """
        if not 0 <= self._current.index - generation <= MAX_AGE:
            return None
        self._current.results.append((key, np.asarray(x, dtype=float), loss))
        if len(self._current.results) < self.popsize:
            return None
        told = self._current.results[: self.popsize]
        self._update([x for _, x, _ in told], [f for _, _, f in told])
        index = self._current.index
        self._current, self._batch = _Generation(index + 1), []
        return Told(index, [k for k, _, _ in told])

    def replay(self, genomes: Sequence[Sequence[float]], losses: Sequence[float]) -> None:
        """Re-apply a stored generation's update (resume)."""
        if len(genomes) != self.popsize:
            raise ValueError(f"stored generation has {len(genomes)} results, popsize is {self.popsize}")
        self._update([np.asarray(x, dtype=float) for x in genomes], list(losses))
        self._current, self._batch = _Generation(self._current.index + 1), []

    def _update(self, xs: list[np.ndarray], losses: list[float]) -> None:
        finite = [f for f in losses if math.isfinite(f)]
        worst = (max(finite) if finite else 0.0) + 1.0  # failures rank last
        self._es.ask()  # pycma refuses two tells without an ask in between; samples unused
        self._es.tell(xs, [f if math.isfinite(f) else worst for f in losses])
