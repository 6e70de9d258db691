"""The parameter-space (PS) search space: a vector of genes in the unit box <-> a Recipe.

Genes come from the declared parameters of the merge operator and its transforms
(:mod:`workers.registry`): a per-expert parameter gives one gene per expert and layout
value, a shared one a gene per layout value, a transform's parameter one gene. Parameters
that are pinned (or not searched by default and given no range) keep a fixed value and
are written into every recipe, so a recipe alone describes its model. The optimizer works
in the unit box; a gene g maps to low + g·(high − low) of its parameter's range.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from evomerge.workers.layout import LayoutKind, num_values
from evomerge.workers.methods import method_spec, transform_spec
from evomerge.storage.kinds import Origin
from evomerge.workers.recipe import MergeRecipe, Recipe, SourceRecipe
from evomerge.workers.methods import ParamSpec

if TYPE_CHECKING:  # the optimizers import this module
    from evomerge.search.optimizers.base import Arm

DECIMALS = 6  # recipe values are rounded so equal genomes hash equally


@dataclass(frozen=True)
class Gene:
    model: str | None  # None for a parameter shared by all experts
    param: str
    group: int
    low: float
    high: float

    def name(self, groups: int) -> str:
        head = f"{self.model}.{self.param}" if self.model else self.param
        return head + (f"[{self.group}]" if groups > 1 else "")


@dataclass(frozen=True)
class SearchSpace:
    """The genes of one study and their mapping to recipes."""

    method: str
    transforms: tuple[str, ...]
    base: str
    experts: tuple[str, ...]
    layout: LayoutKind
    groups: int
    group_size: int | None
    normalize: bool
    seed: int
    genes: tuple[Gene, ...]
    fixed: tuple[tuple[str, float], ...]  # parameters held constant, in declaration order
    diagonal = False  # a few genes: full-covariance CMA-ES

    @classmethod
    def build(cls, method: str, base: str, experts: Sequence[str], num_layers: int, *,
              layout: LayoutKind = "model", group_size: int | None = None, points: int = 3,
              transforms: Sequence[str] = (), normalize: bool = False, seed: int = 0,
              ranges: Mapping[str, tuple[float, float]] | None = None,
              fixed: Mapping[str, float] | None = None) -> "SearchSpace":
        ranges, fixed = dict(ranges or {}), dict(fixed or {})
        op = method_spec(method)
        op.check_experts(len(experts))
        groups = num_values(layout, num_layers, group_size, points)
        genes: list[Gene] = []
        pinned: list[tuple[str, float]] = []

        def searched(p: ParamSpec) -> bool:
            return p.name not in fixed and (p.searched or p.name in ranges)

        for p in op.params:
            if not searched(p):
                pinned.append((p.name, float(fixed.get(p.name, p.default))))
        for model in experts:
            genes += [Gene(model, p.name, g, *ranges.get(p.name, (p.low, p.high)))
                      for p in op.params if p.per_expert and searched(p) for g in range(groups)]
        genes += [Gene(None, p.name, g, *ranges.get(p.name, (p.low, p.high)))
                  for p in op.params if not p.per_expert and searched(p) for g in range(groups)]
        for name in transforms:
            for p in transform_spec(name).params:
                if searched(p):
                    genes.append(Gene(None, p.name, 0, *ranges.get(p.name, (p.low, p.high))))
                else:
                    pinned.append((p.name, float(fixed.get(p.name, p.default))))
        return cls(method, tuple(transforms), base, tuple(experts), layout, groups,
                   group_size if layout == "layer_group" else None, normalize, seed, tuple(genes), tuple(pinned))

    @property
    def dim(self) -> int:
        return len(self.genes)

    def names(self) -> list[str]:
        return [g.name(self.groups) for g in self.genes]

    def _per_expert(self) -> set[str]:
        return {p.name for p in method_spec(self.method).params if p.per_expert}

    def decode(self, unit: Sequence[float], label: str = "") -> Recipe:
        """The recipe of a genome; genes outside the unit box are clipped to it."""
        x = np.clip(np.asarray(unit, dtype=float), 0.0, 1.0)
        params: dict[str, dict[str, list[float]]] = {}
        shared: dict[str, list[float]] = {}
        for gene, value in zip(self.genes, x, strict=True):
            real = round(gene.low + float(value) * (gene.high - gene.low), DECIMALS)
            target = shared.setdefault(gene.param, []) if gene.model is None else \
                params.setdefault(gene.param, {}).setdefault(gene.model, [])
            target.append(real)
        per_expert = self._per_expert()
        for name, value in self.fixed:
            if name in per_expert:
                params[name] = {m: [value] for m in self.experts}
            else:
                shared[name] = [value]
        return MergeRecipe(method=self.method, base=self.base, models=self.experts,
                      params={p: {m: tuple(v) for m, v in per.items()} for p, per in params.items()},
                      shared={p: tuple(v) for p, v in shared.items()}, transforms=self.transforms,
                      layout=self.layout, group_size=self.group_size, normalize=self.normalize,
                      seed=self.seed, label=label)

    def encode(self, recipe: Recipe) -> np.ndarray:
        """The unit-box genome of a recipe of this space."""
        if (not isinstance(recipe, MergeRecipe) or recipe.method != self.method or recipe.models != self.experts
                or recipe.transforms != self.transforms):
            raise ValueError("recipe does not belong to this search space")
        out = []
        for gene in self.genes:
            values = recipe.shared[gene.param] if gene.model is None else recipe.params[gene.param][gene.model]
            value = values[gene.group] if len(values) > 1 else values[0]
            out.append((value - gene.low) / (gene.high - gene.low))
        return np.asarray(out)

    def belongs(self, recipe: Recipe) -> bool:
        return (isinstance(recipe, MergeRecipe) and recipe.method == self.method and recipe.models == self.experts
                and recipe.transforms == self.transforms and recipe.layout == self.layout
                and recipe.group_size == self.group_size)

    def arms(self, popsize: int | None, init: float) -> tuple[Arm, ...]:
        """One search, not a portfolio."""
        return ()

    def leave_one_out(self, genome: Sequence[float]) -> list[tuple[str, list[float]]]:
        """Per expert, ``genome`` with that expert's weight genes at weight 0 (left out of the
        merge); none when the method has no per-expert weight."""
        out = []
        for expert in self.experts:
            mine = [i for i, g in enumerate(self.genes) if g.model == expert and g.param == "weight"]
            if not mine:
                return []
            x = list(genome)
            for i in mine:
                gene = self.genes[i]
                x[i] = min(max((0.0 - gene.low) / (gene.high - gene.low), 0.0), 1.0)
            out.append((expert, x))
        return out

    def genome_of(self, recipe: Recipe) -> tuple[float, ...] | None:
        """The genome of a baseline that lies in this space (the untuned merge), else None."""
        return tuple(float(v) for v in self.encode(recipe)) if self.belongs(recipe) else None

    def baselines(self, sources: Sequence[str], init: float, leave_one_out: bool) -> list[tuple[Origin, Recipe]]:
        """The sources themselves, a uniform soup, and the search's method at its initial genes
        (with ``leave_one_out`` and three experts or more, also without each expert in turn)."""
        out: list[tuple[Origin, Recipe]] = [(Origin.SOURCE, SourceRecipe(source=m, label=f"source {m}"))
                                            for m in sources]
        out.append((Origin.UNTUNED, MergeRecipe(
            method="linear", base=self.base, models=self.experts, normalize=False, label="untuned soup",
            params={"weight": {m: (round(1 / len(self.experts), 6),) for m in self.experts}})))
        initial = self.initial(init)
        out.append((Origin.UNTUNED, self.decode(initial, label=f"untuned {self.method}")))
        if leave_one_out and len(self.experts) >= 3:
            # An expert that hurts the merge (Sakana's distraction ablation) shows at once,
            # and the optimizer starts from the merge without it.
            out += [(Origin.UNTUNED, self.decode(x, label=f"untuned {self.method} without {name}"))
                    for name, x in self.leave_one_out(initial)]
        return out

    def initial(self, init: float) -> list[float]:
        """The optimizer's starting point: every gene at ``init`` (Sakana: 0.5)."""
        return [init] * self.dim

    def bounds(self) -> dict[str, tuple[float, float]]:
        return {n: (g.low, g.high) for n, g in zip(self.names(), self.genes)}

    def reject(self, recipe: Recipe) -> str | None:
        """Every PS recipe of this space can be evaluated."""
        return None

    def params_of(self, recipe: Recipe) -> dict[str, float]:
        """Gene name -> real parameter value (what Optuna and the dashboard show)."""
        return {n: round(float(g.low + u * (g.high - g.low)), DECIMALS)
                for n, g, u in zip(self.names(), self.genes, self.encode(recipe))}

    def box_violation(self, unit: Sequence[float]) -> float:
        return box_violation(unit)


def box_violation(unit: Sequence[float]) -> float:
    """Squared distance of a genome outside the unit box (penalised by the optimizer)."""
    x = np.asarray(unit, dtype=float)
    return float(np.sum((x - np.clip(x, 0.0, 1.0)) ** 2))
