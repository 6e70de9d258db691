"""The optimizer seam: ask for a genome, tell its outcome, rebuild from the ledger.

In the spirit of Optuna's ``BaseSampler``: the controller knows this interface only.
An optimizer works in the unit box ``[0, 1]^dim`` (the search space maps genes to a
recipe) and *maximizes* its objective values. Its state must be a function of what it
was told, so a controller killed at any point can rebuild it from the stored trials
(:meth:`Optimizer.restore`): nothing is ever pickled into, or unpickled from, the
database.

Batch optimizers (CMA-ES) report each completed update as an :class:`Update` that the
controller stores in order and hands back on restore; model-based samplers (TPE, GP) and
random search need only the evaluated points.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar


def default_popsize(dim: int) -> int:
    """4 + ⌊3 ln n⌋, pycma's and the paper's default population (also the batch size of
    the other optimizers: their random start, NSGA-II's population)."""
    return 4 + int(3 * math.log(max(dim, 1)))


@dataclass(frozen=True)
class Proposal:
    """A genome to evaluate; ``generation`` tags the distribution it came from (or None)."""

    x: tuple[float, ...]
    generation: int | None = None


@dataclass(frozen=True)
class Evaluated:
    """The outcome of one genome, keyed by its candidate id.

    ``values`` are the objective values to maximize (one per objective), or None when the
    candidate failed (a crash, a rejected recipe, a non-finite score). ``prior`` marks a
    point the optimizer did not propose (a baseline that belongs to the space): knowledge
    to start from, not a result of its own proposals. ``documents`` is how many search
    documents the values rest on (None: not known), so a rule can tell progress from noise.
    """

    key: int
    x: tuple[float, ...]
    values: tuple[float, ...] | None
    generation: int | None = None
    prior: bool = False
    documents: int | None = None


@dataclass(frozen=True)
class Update:
    """A batch the optimizer's state was updated with (its index and members, in order)."""

    index: int
    keys: tuple[int, ...]


@dataclass(frozen=True)
class Arm:
    """One sub-search of a portfolio (``merge.method``/``granularity: auto``): a merge family
    at a granularity, with its own genes in the unit box.

    ``refines``: the index of the arm this one refines (None: it competes from the start);
    it opens when that arm is the last one left and stagnates. ``seeded``: it starts at that
    arm's best genome, gene ``j`` copied from gene ``expand[j]`` of it; else at its own ``x0``.
    """

    label: str
    dim: int
    popsize: int
    x0: tuple[float, ...]
    refines: int | None = None
    expand: tuple[int, ...] = ()
    seeded: bool = True


@dataclass(frozen=True)
class OptimizerSettings:
    """What every optimizer may read: the box dimension, objectives and config values."""

    dim: int
    objectives: int
    seed: int
    popsize: int
    sigma0: float
    x0: tuple[float, ...]  # the space's start (every gene at optimizer.init, or a route's start)
    diagonal: bool
    restarts: int
    stream: int  # how many proposals earlier runs drew: a resumed run draws fresh numbers
    # a portfolio's arms (genome: an arm code, then that arm's genes); empty: one plain search
    arms: tuple[Arm, ...] = ()


class Optimizer(ABC):
    """Ask/tell over the unit box, rebuilt from stored outcomes.

    Subclasses set ``name`` (the config's ``optimizer.name`` and the origin of the
    candidates they propose) and register themselves with :func:`search.optimizers.register`.
    """

    name: ClassVar[str]
    multi_objective: ClassVar[bool] = False  # True: one objective per task

    def __init__(self, settings: OptimizerSettings) -> None:
        self.settings = settings

    @abstractmethod
    def ask(self) -> Proposal:
        """The next genome to evaluate (may lie slightly outside the box: it is clipped)."""

    @abstractmethod
    def tell(self, result: Evaluated) -> Update | None:
        """Learn one outcome, in any order relative to the asks; an :class:`Update` the
        controller must store (for :meth:`restore`) when this completed a batch."""

    def restore(self, updates: Sequence[Sequence[Evaluated]], rest: Sequence[Evaluated]) -> None:
        """Rebuild the state of an earlier run: ``updates`` are the stored batches in order,
        ``rest`` every other evaluated outcome (priors first, then by evaluation order).

        The default replays every outcome through :meth:`tell`, right for optimizers
        whose state is the set of evaluated points.
        """
        for batch in updates:
            for result in batch:
                self.tell(result)
        for result in rest:
            self.tell(result)

    @property
    def origin(self) -> str:
        """What the candidates it proposes are stored as (their ``origin``)."""
        return self.name

    def describe(self) -> str:
        """One line for ``evomerge status`` and the dashboard."""
        return self.name


def arm_code(arm: int, arms: int) -> float:
    """The first gene of a portfolio genome: the middle of the arm's share of [0, 1]."""
    return (arm + 0.5) / arms


def arm_index(code: float, arms: int) -> int:
    """The arm a portfolio genome's first gene names."""
    return min(max(int(code * arms), 0), arms - 1)
