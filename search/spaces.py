"""What the controller needs of a search space, whichever space it is.

A space maps genomes in the unit box to recipes and back, and says which baselines a study
starts with. The parameter space (:class:`~evomerge.search.space.SearchSpace`), a portfolio
of them (:class:`~evomerge.search.portfolio.PortfolioSpace`, what ``merge.method`` and
``granularity: auto`` search) and the data-flow space
(:class:`~evomerge.search.dfs_space.RouteSpace`) implement it; the controller, the stages
and the observers name none of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from evomerge.search.optimizers.base import Arm
from evomerge.storage.kinds import Origin
from evomerge.workers.recipe import Recipe


class Space(Protocol):
    """A search space: genes in the unit box <-> recipes."""

    @property
    def dim(self) -> int:
        """How many genes a genome has."""

    @property
    def diagonal(self) -> bool:
        """Whether CMA-ES should default to its diagonal (separable) form here: the large
        route spaces do, the few-gene parameter spaces do not."""

    def decode(self, unit: Sequence[float], label: str = "") -> Recipe:
        """The recipe of a genome (clipped to the box)."""

    def initial(self, init: float) -> list[float]:
        """The optimizer's starting genome for the config's ``optimizer.init``."""

    def baselines(self, sources: Sequence[str], init: float, leave_one_out: bool) -> list[tuple[Origin, Recipe]]:
        """The recipes a study evaluates before any proposal, with their origin: ``sources``
        are the study's models in config order; ``leave_one_out`` adds, per expert, the
        untuned merge without it."""

    def belongs(self, recipe: Recipe) -> bool:
        """Whether ``recipe`` is one of this space's recipes."""

    def genome_of(self, recipe: Recipe) -> tuple[float, ...] | None:
        """The genome of a baseline that lies in this space, else None."""

    def params_of(self, recipe: Recipe) -> dict[str, float]:
        """What Optuna and the dashboard show of one of this space's recipes."""

    def bounds(self) -> dict[str, tuple[float, float]]:
        """Optuna's range of each parameter :meth:`params_of` gives."""

    def reject(self, recipe: Recipe) -> str | None:
        """Why ``recipe`` must not be evaluated (recorded as failed), or None."""

    def arms(self, popsize: int | None, init: float) -> tuple[Arm, ...]:
        """The sub-searches of a portfolio space (search/portfolio.py), each with the config's
        ``popsize`` (None: its default) and genes starting at ``init``; empty for one search."""
