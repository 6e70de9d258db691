"""Optuna's own samplers behind our interface, through Optuna's ask/tell API.

Each optimizer keeps a private in-memory Optuna study whose parameters are the genes
(``g0``..``g{n-1}`` in [0, 1]); the persistent ledger stays ours. Asking creates a
RUNNING in-memory trial, telling finishes it; several asks may be open at once, which is
how the asynchronous controller keeps every worker busy (TPE counts open trials through
its constant liar). A restore replays every stored outcome as a finished trial with its
stored genes (``enqueue_trial`` then ``ask``), so the sampler's own bookkeeping (NSGA-II's
generations) runs as it did; a resumed search is consistent but not bit-identical.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import Trial, TrialState

from evomerge.search.optimizers.base import Evaluated, Optimizer, OptimizerSettings, Proposal, Update


class OptunaSampler(Optimizer):
    """Base of the Optuna-backed optimizers: subclasses choose the sampler."""

    def __init__(self, settings: OptimizerSettings) -> None:
        super().__init__(settings)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        directions = ["maximize"] * (settings.objectives if self.multi_objective else 1)
        self._study = optuna.create_study(directions=directions, sampler=self.sampler(settings.seed + settings.stream))
        self._dists = {f"g{i}": FloatDistribution(0.0, 1.0) for i in range(settings.dim)}
        self._open: dict[tuple[float, ...], list[Trial]] = {}  # asked, not yet told, by genome

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        raise NotImplementedError

    def _trial(self, params: dict[str, float] | None = None) -> Trial:
        if params is not None:
            self._study.enqueue_trial(params, skip_if_exists=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return self._study.ask(self._dists)

    def ask(self) -> Proposal:
        trial = self._trial()
        x = tuple(float(trial.params[f"g{i}"]) for i in range(self.settings.dim))
        self._open.setdefault(x, []).append(trial)
        return Proposal(x)

    def tell(self, result: Evaluated) -> Update | None:
        waiting = self._open.get(result.x)
        if waiting:
            trial = waiting.pop(0)
        else:  # a prior, or a proposal of an earlier run: enter it with its own genes
            trial = self._trial({f"g{i}": min(max(v, 0.0), 1.0) for i, v in enumerate(result.x)})
        if result.values is None:
            self._study.tell(trial, state=TrialState.FAIL)
        else:
            values = list(result.values) if self.multi_objective else result.values[0]
            self._study.tell(trial, values)
        return None

    def restore(self, updates: Sequence[Sequence[Evaluated]], rest: Sequence[Evaluated]) -> None:
        super().restore(updates, rest)
        self._open.clear()

    def describe(self) -> str:
        done = sum(1 for t in self._study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE)
        return f"{self.name} (optuna {type(self._study.sampler).__name__}, {done} points told)"


class TPE(OptunaSampler):
    """Multivariate TPE (Bergstra et al. 2011; Falkner et al. 2018), constant liar for
    asynchronous asks; the first ``popsize`` points (after priors) are random."""

    name = "tpe"

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                              n_startup_trials=self.settings.popsize)


class GP(OptunaSampler):
    """Gaussian-process Bayesian optimisation (Optuna's GPSampler, log expected improvement).
    It does not model open trials, so parallel asks may land close together; its cost grows
    cubically with the trials told: meant for budgets of hundreds, not thousands."""

    name = "gp"

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=self.settings.popsize,
                                         warn_independent_sampling=False)


class NSGA2(OptunaSampler):
    """NSGA-II (Deb et al. 2002) with one objective per task: the result is a Pareto front
    of recipes trading the tasks off, not one best recipe."""

    name = "nsga2"
    multi_objective = True

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(self.settings.popsize, 4))
