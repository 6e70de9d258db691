"""The parameter-space (PS) search space: a vector of genes in the unit box <-> a Recipe.

Genes are built from the merge operator's declared parameters: for each expert, each
parameter, each gene group (one group per model, or per layer group plus one for
embeddings/norms/head). The optimizer works in the unit box; a gene g maps to
low + g·(high − low) of its parameter's range.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from workers.materialize import num_gene_groups
from workers.operators import get_operator
from workers.recipe import Recipe

DECIMALS = 6  # recipe values are rounded so equal genomes hash equally


@dataclass(frozen=True)
class Gene:
    model: str
    param: str
    group: int
    low: float
    high: float

    def name(self, groups: int) -> str:
        return f"{self.model}.{self.param}" + (f"[{self.group}]" if groups > 1 else "")


@dataclass(frozen=True)
class SearchSpace:
    """The genes of one study and their mapping to recipes."""

    method: str
    base: str
    experts: tuple[str, ...]
    groups: int
    group_size: int | None
    normalize: bool
    seed: int
    genes: tuple[Gene, ...]

    @classmethod
    def build(cls, method: str, base: str, experts: Sequence[str], num_layers: int, group_size: int | None,
              normalize: bool, seed: int, ranges: Mapping[str, tuple[float, float]]) -> "SearchSpace":
        op = get_operator(method)
        groups = num_gene_groups(num_layers, group_size)
        genes = tuple(
            Gene(model, p.name, g, *ranges.get(p.name, (p.low, p.high)))
            for model in experts for p in op.params for g in range(groups))
        return cls(method, base, tuple(experts), groups, group_size, normalize, seed, genes)

    @property
    def dim(self) -> int:
        return len(self.genes)

    def names(self) -> list[str]:
        return [g.name(self.groups) for g in self.genes]

    def decode(self, unit: Sequence[float], label: str = "") -> Recipe:
        """The recipe of a genome; genes outside the unit box are clipped to it."""
        x = np.clip(np.asarray(unit, dtype=float), 0.0, 1.0)
        params: dict[str, dict[str, list[float]]] = {}
        for gene, value in zip(self.genes, x, strict=True):
            real = round(gene.low + float(value) * (gene.high - gene.low), DECIMALS)
            params.setdefault(gene.param, {}).setdefault(gene.model, []).append(real)
        return Recipe(kind="merge", method=self.method, base=self.base, models=self.experts,
                      params={p: {m: tuple(v) for m, v in per.items()} for p, per in params.items()},
                      group_size=self.group_size, normalize=self.normalize, seed=self.seed, label=label)

    def encode(self, recipe: Recipe) -> np.ndarray:
        """The unit-box genome of a recipe of this space."""
        if recipe.kind != "merge" or recipe.method != self.method or recipe.models != self.experts:
            raise ValueError("recipe does not belong to this search space")
        out = []
        for gene in self.genes:
            values = recipe.params[gene.param][gene.model]
            value = values[gene.group] if len(values) > 1 else values[0]
            out.append((value - gene.low) / (gene.high - gene.low))
        return np.asarray(out)

    def params_of(self, recipe: Recipe) -> dict[str, float]:
        """Gene name -> real parameter value (what Optuna and the dashboard show)."""
        return {n: round(float(g.low + u * (g.high - g.low)), DECIMALS)
                for n, g, u in zip(self.names(), self.genes, self.encode(recipe))}

    def box_violation(self, unit: Sequence[float]) -> float:
        """Squared distance of a genome outside the unit box (penalised by the optimizer)."""
        x = np.asarray(unit, dtype=float)
        return float(np.sum((x - np.clip(x, 0.0, 1.0)) ** 2))
