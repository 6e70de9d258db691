"""Random search: uniform genomes in the unit box, the baseline every claim is measured against.

Bergstra & Bengio (JMLR 2012) showed it to be a strong baseline for low effective
dimension; a search method that does not beat it on the same budget earns nothing.
"""

from __future__ import annotations

import numpy as np

from evomerge.search.optimizers.base import Evaluated, Optimizer, OptimizerSettings, Proposal, Update


class RandomSearch(Optimizer):
    """Independent uniform draws; the outcomes teach it nothing (restore is a no-op)."""

    name = "random"

    def __init__(self, settings: OptimizerSettings) -> None:
        super().__init__(settings)
        # ``stream`` separates the draws of a resumed run from the first run's.
        self._rng = np.random.default_rng([settings.seed, settings.stream])

    def ask(self) -> Proposal:
        return Proposal(tuple(float(v) for v in self._rng.uniform(0.0, 1.0, self.settings.dim)))

    def tell(self, result: Evaluated) -> Update | None:
        return None
