"""The optimizers, by the name a config gives them (``optimizer.name``).

Adding one is a new module with an :class:`Optimizer` subclass, its entry below, and its
name in :class:`search.config.OptimizerConfig`'s ``name`` field.
"""

from __future__ import annotations

from evomerge.search.optimizers.base import Arm, Evaluated, Optimizer, OptimizerSettings, Proposal, Update
from evomerge.search.optimizers.cmaes import CMAOptimizer
from evomerge.search.optimizers.optuna_samplers import GP, NSGA2, TPE
from evomerge.search.optimizers.portfolio import Portfolio
from evomerge.search.optimizers.random_search import RandomSearch

OPTIMIZERS: dict[str, type[Optimizer]] = {cls.name: cls for cls in (CMAOptimizer, RandomSearch, TPE, GP, NSGA2)}


def build_optimizer(name: str, settings: OptimizerSettings) -> Optimizer:
    """A fresh optimizer of the registered ``name``; with ``settings.arms``, a portfolio of
    them, one per arm."""
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r} (known: {', '.join(sorted(OPTIMIZERS))})") from None
    return Portfolio(settings, cls) if settings.arms else cls(settings)


__all__ = ["OPTIMIZERS", "Arm", "Evaluated", "Optimizer", "OptimizerSettings", "Proposal", "Update", "build_optimizer"]
