"""The space of ``merge.method: auto`` and ``granularity: auto``: several parameter spaces
(arms), one recipe of one method each.

A genome is an arm code (:func:`~evomerge.search.optimizers.base.arm_code`) followed by that
arm's genes; the rest of the vector is unused. Every recipe is an ordinary merge recipe of
one method, so replay, mergekit export and the dashboard treat it like any other. The
portfolio optimizer (search/optimizers/portfolio.py) decides which arm each proposal comes from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from evomerge.search.families import family_label, fine_group_size
from evomerge.search.optimizers.base import Arm, arm_code, arm_index, default_popsize
from evomerge.search.space import SearchSpace
from evomerge.storage.kinds import Origin
from evomerge.workers.layout import LayoutKind
from evomerge.workers.recipe import Recipe


def arm_label(space: SearchSpace) -> str:
    return family_label(space.method, space.layout)


@dataclass(frozen=True)
class PortfolioSpace:
    """Arms searched side by side, and merges with nothing to search (baselines only)."""

    spaces: tuple[SearchSpace, ...]
    refines: tuple[int | None, ...]  # per arm: the arm it refines (None: it competes from the start)
    # per arm that refines another: True, it starts at that arm's best genome; False, at its
    # own untuned merge (ignored for the others)
    seeded: tuple[bool, ...]
    fixed_merges: tuple[SearchSpace, ...] = ()  # families without genes (Model Stock)
    diagonal = False

    @classmethod
    def build(cls, methods: Sequence[str], base: str, experts: Sequence[str], num_layers: int, *,
              layout: LayoutKind, group_size: int | None, fine: bool, fine_size: int = 2,
              **options: object) -> "PortfolioSpace":
        """One arm per method at ``layout``; with ``fine``, two finer arms (layer groups of
        :func:`~evomerge.search.families.fine_group_size` from ``fine_size``) refining each:
        one seeded from its best genome, one from the family's untuned merge (the best coarse
        genome can sit in a basin that per-layer genes cannot leave in a few generations:
        benchmarks' ``layered``). ``options`` go to :meth:`SearchSpace.build`."""
        coarse = [SearchSpace.build(m, base, experts, num_layers, layout=layout, group_size=group_size,
                                    **options) for m in methods]  # type: ignore[arg-type]
        arms = [s for s in coarse if s.dim > 0]
        if not arms:
            raise ValueError(f"none of {', '.join(methods)} has a parameter to search")
        refines: list[int | None] = [None] * len(arms)
        seeded = [True] * len(arms)
        if fine:
            for i, s in enumerate(list(arms)):
                finer = SearchSpace.build(s.method, base, experts, num_layers, layout="layer_group",
                                          group_size=fine_group_size(num_layers, fine_size), **options)  # type: ignore[arg-type]
                arms += [finer, finer]
                refines += [i, i]
                seeded += [True, False]
        return cls(tuple(arms), tuple(refines), tuple(seeded), tuple(s for s in coarse if s.dim == 0))

    @property
    def dim(self) -> int:
        return 1 + max(s.dim for s in self.spaces)

    def _arm(self, unit: Sequence[float]) -> tuple[SearchSpace, Sequence[float]]:
        space = self.spaces[arm_index(float(unit[0]), len(self.spaces))]
        return space, list(unit[1:1 + space.dim])

    def decode(self, unit: Sequence[float], label: str = "") -> Recipe:
        space, genes = self._arm(unit)
        return space.decode(genes, label)

    def initial(self, init: float) -> list[float]:
        return [arm_code(0, len(self.spaces))] + [init] * (self.dim - 1)

    def baselines(self, sources: Sequence[str], init: float, leave_one_out: bool) -> list[tuple[Origin, Recipe]]:
        """The first arm's baselines (sources, soup, its untuned merge, leave-one-out), then the
        untuned merge of every other competing family and of the merges without genes."""
        first, *others = [s for s, r in zip(self.spaces, self.refines) if r is None]
        out = first.baselines(sources, init, leave_one_out)
        out += [(Origin.UNTUNED, s.decode(s.initial(init), label=f"untuned {s.method}"))
                for s in (*others, *self.fixed_merges)]
        return out

    def _owner(self, recipe: Recipe) -> int | None:
        return next((i for i, s in enumerate(self.spaces) if s.belongs(recipe)), None)

    def belongs(self, recipe: Recipe) -> bool:
        return self._owner(recipe) is not None

    def genome_of(self, recipe: Recipe) -> tuple[float, ...] | None:
        i = self._owner(recipe)
        if i is None:
            return None
        return (arm_code(i, len(self.spaces)), *(float(v) for v in self.spaces[i].encode(recipe)))

    def params_of(self, recipe: Recipe) -> dict[str, float]:
        i = self._owner(recipe)
        if i is None:
            return {}
        space = self.spaces[i]
        return {f"{arm_label(space)}.{name}": v for name, v in space.params_of(recipe).items()}

    def bounds(self) -> dict[str, tuple[float, float]]:
        return {f"{arm_label(s)}.{name}": b for s in self.spaces for name, b in s.bounds().items()}

    def reject(self, recipe: Recipe) -> str | None:
        return None

    def arms(self, popsize: int | None, init: float) -> tuple[Arm, ...]:
        """What the portfolio optimizer needs of each arm: ``popsize`` (the config's) overrides
        each arm's default population; every gene starts at ``init``."""
        out = []
        for space, refines, from_best in zip(self.spaces, self.refines, self.seeded):
            expand: tuple[int, ...] = ()
            label = arm_label(space)
            if refines is not None:
                coarse = self.spaces[refines]
                at = {(g.model, g.param): k for k, g in enumerate(coarse.genes)}
                expand = tuple(at[(g.model, g.param)] for g in space.genes)
                label += "" if from_best else " (from untuned)"
            out.append(Arm(label, space.dim, popsize or default_popsize(space.dim),
                           tuple(space.initial(init)), refines, expand, from_best))
        return tuple(out)
