"""The data-flow-space (DFS) search space: genes in the unit box <-> a layer route.

Akiba et al. (2024, §3.2): lay the collection's layers out one model after another
(A_1..A_L, B_1..B_L, ...) and repeat that layout r times; slot t is on the path iff its
inclusion gene I_t > 0, so a path is a subsequence of the layout. Each slot also has a
scale gene (Sakana's released runtime: one scale per hop instead of the paper's full
matrix W, which would be M×M genes). Slots are blocks of ``block`` consecutive layers of
one model (1 = single layers). With ``pin_ends``, A's first and last layers always start
and end the path (scale 1) and are left out of the layout.

In the unit box an inclusion gene g means I = g − 0.5 (on iff g > 0.5) and a scale gene
maps to ``low + g·(high − low)``. The initial point puts A's slots of the first repetition
on and every other slot off, with scales 1: the search starts from model A, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from evomerge.search.space import box_violation
from evomerge.storage.kinds import Origin
from evomerge.workers.recipe import Recipe, RouteRecipe, SourceRecipe

if TYPE_CHECKING:  # the optimizers import search.space, which this module imports
    from evomerge.search.optimizers.base import Arm

DECIMALS = 4  # scales are rounded so equal genomes hash equally
INIT_MARGIN = 0.25  # initial inclusion genes at 0.5 ± this: on for A's first repetition, else off


@dataclass(frozen=True)
class Slot:
    repeat: int
    model: str
    layers: tuple[int, ...]  # consecutive layers of ``model``

    def name(self, letter: str) -> str:
        span = f"{self.layers[0]}" if len(self.layers) == 1 else f"{self.layers[0]}-{self.layers[-1]}"
        return f"r{self.repeat}.{letter}{span}"


@dataclass(frozen=True)
class RouteLimits:
    """Paths rejected before evaluation: longer than ``max_hops``, or whose estimated
    activation and KV-cache memory for one evaluation batch exceeds ``memory_bytes``."""

    max_hops: int
    memory_bytes: float | None = None
    bytes_per_hop: float = 0.0


@dataclass(frozen=True)
class RouteSpace:
    """The genes of one DFS study and their mapping to route recipes."""

    models: tuple[str, ...]  # the collection, A first
    num_layers: tuple[int, ...]
    repeats: int
    block: int
    pin_ends: bool
    scale_range: tuple[float, float]
    limits: RouteLimits
    members: tuple[tuple[str, Recipe], ...] = ()  # collection models that are merges (PS+DFS)
    scale_genes: bool = True  # False: every hop at scale 1, inclusion genes only
    diagonal = True  # up to thousands of genes: separable CMA-ES by default

    @property
    def slots(self) -> tuple[Slot, ...]:
        out = []
        for repeat in range(self.repeats):
            for i, (model, count) in enumerate(zip(self.models, self.num_layers)):
                layers = list(range(count))
                if self.pin_ends and i == 0:
                    layers = layers[1:-1]
                out += [Slot(repeat, model, tuple(layers[s:s + self.block])) for s in range(0, len(layers), self.block)]
        return tuple(out)

    @property
    def dim(self) -> int:
        return (2 if self.scale_genes else 1) * len(self.slots)

    def _letters(self) -> dict[str, str]:
        return {m: chr(65 + i) for i, m in enumerate(self.models)}

    def names(self) -> list[str]:
        letters = self._letters()
        slots = self.slots
        scales = [f"{s.name(letters[s.model])}.scale" for s in slots] if self.scale_genes else []
        return [f"{s.name(letters[s.model])}.on" for s in slots] + scales

    def x0(self) -> list[float]:
        """The paper's start: A's layers of the first repetition on, all scales 1."""
        low, high = self.scale_range
        unit_one = (1.0 - low) / (high - low)
        on = [0.5 + INIT_MARGIN if s.repeat == 0 and s.model == self.models[0] else 0.5 - INIT_MARGIN
              for s in self.slots]
        return on + ([unit_one] * len(self.slots) if self.scale_genes else [])

    def decode(self, unit: Sequence[float], label: str = "") -> Recipe:
        """The route of a genome (genes outside the unit box are clipped to it)."""
        x = np.clip(np.asarray(unit, dtype=float), 0.0, 1.0)
        slots = self.slots
        if len(x) != self.dim:
            raise ValueError(f"genome of {len(x)} genes for a space of {self.dim}")
        low, high = self.scale_range
        scale_units = x[len(slots):] if self.scale_genes else np.full(len(slots), (1.0 - low) / (high - low))
        hops: list[tuple[str, int]] = []
        scales: list[float] = []
        head, last = self.models[0], self.num_layers[0] - 1
        if self.pin_ends:
            hops.append((head, 0))
            scales.append(1.0)
        for slot, on, g in zip(slots, x[: len(slots)], scale_units):
            if on - 0.5 > 0:  # I_t > 0
                for k, layer in enumerate(slot.layers):
                    hops.append((slot.model, layer))
                    scales.append(round(low + float(g) * (high - low), DECIMALS) if k == 0 and self.scale_genes else 1.0)
        if self.pin_ends and last > 0:
            hops.append((head, last))
            scales.append(1.0)
        return RouteRecipe(base=head, models=self.models, route=tuple(hops), scales=tuple(scales),
                      members=dict(self.members), label=label)

    def initial(self, init: float) -> list[float]:
        """The optimizer's starting point (``init`` is the PS setting; routes start from A)."""
        return self.x0()

    def identity(self, label: str = "") -> Recipe:
        """Model A as a route (its layers in order, scales 1)."""
        head = self.models[0]
        layers = tuple((head, i) for i in range(self.num_layers[0]))
        return RouteRecipe(base=head, models=self.models, route=layers, scales=(1.0,) * len(layers),
                      members=dict(self.members), label=label)

    def baselines(self, sources: Sequence[str], init: float, leave_one_out: bool) -> list[tuple[Origin, Recipe]]:
        """The collection's models as they are (merged members as merges) and model A as a route."""
        members = dict(self.members)
        out: list[tuple[Origin, Recipe]] = [
            (Origin.SOURCE, members[m].model_copy(update={"label": f"PS model {m}"}) if m in members
             else SourceRecipe(source=m, label=f"source {m}")) for m in self.models]
        return out + [(Origin.UNTUNED, self.identity(label=f"model {self.models[0]} as a route"))]

    def belongs(self, recipe: Recipe) -> bool:
        return isinstance(recipe, RouteRecipe) and recipe.models == self.models

    def genome_of(self, recipe: Recipe) -> tuple[float, ...] | None:
        """The genome of a baseline, when it has one: model A as a route is the start."""
        return tuple(self.x0()) if recipe.content_hash == self.identity().content_hash else None

    def params_of(self, recipe: Recipe) -> dict[str, float]:
        """What Optuna and the dashboard show for a route: its length (the path is an attribute)."""
        return {"hops": float(len(recipe.route))}

    @property
    def longest(self) -> int:
        """The longest path this space can decode (every slot on)."""
        return sum(len(s.layers) for s in self.slots) + (2 if self.pin_ends else 0)

    def bounds(self) -> dict[str, tuple[float, float]]:
        """Optuna's range of the ``hops`` parameter: every decodable path, rejected ones included."""
        return {"hops": (0.0, float(max(self.longest, 1)))}

    def box_violation(self, unit: Sequence[float]) -> float:
        return box_violation(unit)

    def arms(self, popsize: int | None, init: float) -> tuple[Arm, ...]:
        """One search, not a portfolio."""
        return ()

    def reject(self, recipe: Recipe) -> str | None:
        """Why a route must not be evaluated, or None. Other recipes of a DFS study (its
        source baselines: the collection's models as they are) are never rejected here."""
        if not isinstance(recipe, RouteRecipe):
            return None
        hops = len(recipe.route)
        if hops == 0:
            return "empty path: no slot is on"
        if hops > self.limits.max_hops:
            return f"path of {hops} hops exceeds dfs.max_hops {self.limits.max_hops}"
        need = hops * self.limits.bytes_per_hop
        if self.limits.memory_bytes is not None and need > self.limits.memory_bytes:
            return (f"path of {hops} hops needs about {need / 2**30:.2f} GiB of activations and KV cache, "
                    f"over dfs.memory_gb {self.limits.memory_bytes / 2**30:.2f}")
        return None
