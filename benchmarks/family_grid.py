"""Which merge family wins a landscape: each family's best held-out score over a small grid of
its own parameters, with the project's real operators (``evomerge.workers.registry``).

    python benchmarks/family_grid.py [--only NAME[,NAME]]
    python benchmarks/landscapes.py --families [--only NAME[,NAME]]   # the same

For every landscape of ``benchmarks/landscapes.py`` and every family ``merge.method: auto``
chooses among for its number of experts (``evomerge.search.families``), the merged model is
scored on the held-out split (mean over the three tasks, 200 items each: binomial std ≲ 0.02)
at every point of the family's grid, and one row is printed: the best score and where, and the
*untuned* score (every parameter at its declared default, every weight 1.0); then, for the
families with a density, the best score at each density (1.0: no drop or trim). The grid gives each expert its own
weight (:data:`WEIGHTS`; experts after the second only :data:`EXTRA_WEIGHTS`, for the
distractors) and every other parameter one value shared by the experts (:data:`GRID`);
parameters not in the grid (``scale``, consensus's ``k``) keep their defaults. Random methods
(``dare_ties``) draw their masks from the per-tensor seed a worker derives from the recipe's
``seed`` (:data:`SEED`), so the table is deterministic.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))  # landscapes.py, when imported from elsewhere
from landscapes import CACHE, TASKS, Landscape, heldout, landscapes  # noqa: E402

from evomerge.demo.build_demo import accuracy, build_tokenizer  # noqa: E402
from evomerge.search.families import AUTO, families  # noqa: E402
from evomerge.workers.layout import tensor_seed  # noqa: E402
from evomerge.workers.registry import get_operator  # noqa: E402

WEIGHTS = (0.25, 0.5, 0.75, 1.0)  # per expert: the default box is [0, 1]
EXTRA_WEIGHTS = (0.0, 0.5)  # experts after the second (the distractors)
DENSITIES = (0.2, 0.5, 0.8, 1.0)  # 1.0: no drop or trim, the sign election only
GRID: dict[str, dict[str, tuple[float, ...]]] = {  # besides the weights; one value for all experts
    "task_arithmetic": {},
    "ties": {"density": DENSITIES},
    "dare_ties": {"density": DENSITIES},
    "breadcrumbs_ties": {"density": (0.5, 0.8, 1.0), "gamma": (0.01, 0.05)},
    "consensus": {"tall": (0.2, 0.4, 0.8)},
    "model_stock": {},
}
SEED = 0  # the recipe seed of the random methods' masks (the demo's merge.seed)



@dataclass(frozen=True)
class FamilyRow:
    """One family on one landscape: its best grid point, the untuned merge, and the best per density."""

    method: str
    best: float
    at: dict[str, object]
    untuned: float
    points: int
    by_density: dict[float, float]


class Merger:
    """One landscape's sources in memory and a working model to load each merge into."""

    def __init__(self, land: Landscape) -> None:
        paths = land.paths()
        self.land = land
        self.states = {m: LlamaForCausalLM.from_pretrained(p).state_dict() for m, p in paths.items()}
        self.model = LlamaForCausalLM.from_pretrained(paths[land.base_model]).eval()
        self.tok = build_tokenizer()
        self.data = heldout(land)

    @torch.no_grad()
    def score(self, method: str, params: dict[str, object]) -> float:
        """Held-out task mean of ``method``'s merge; ``params`` holds a tuple per expert or one
        value for per-expert parameters, one value for the others; the rest keep their defaults."""
        op = get_operator(method)
        n = len(self.land.experts)
        kwargs: dict[str, object] = {}
        for spec in op.params:
            value = params.get(spec.name, spec.default)
            kwargs[spec.name] = (value if isinstance(value, tuple) else (value,) * n) if spec.per_expert else value
        merged = {}
        for key, base in self.states[self.land.base_model].items():
            generator = torch.Generator().manual_seed(tensor_seed(SEED, key)) if op.random else None
            merged[key] = op.fn(base, [self.states[e][key] for e in self.land.experts], normalize=False,
                                generator=generator, **kwargs)
        self.model.load_state_dict(merged)
        return self.source_score()

    @torch.no_grad()
    def source_score(self, name: str | None = None) -> float:
        if name is not None:
            self.model.load_state_dict(self.states[name])
        return sum(accuracy(self.model, ex, self.tok) for ex in self.data.values()) / len(self.data)


def points(method: str, n_experts: int) -> Iterator[dict[str, object]]:
    """Every grid point of ``method`` for ``n_experts`` experts."""
    weights = [WEIGHTS] * min(n_experts, 2) + [EXTRA_WEIGHTS] * max(0, n_experts - 2)
    if "weight" not in get_operator(method).param_names:
        weights = []
    grid = GRID.get(method, {})
    for w in itertools.product(*weights):
        for values in itertools.product(*grid.values()):
            yield ({"weight": w} if w else {}) | dict(zip(grid, values))


def _show(params: dict[str, object]) -> str:
    def fmt(v: object) -> str:
        return "(" + ", ".join(f"{x:g}" for x in v) + ")" if isinstance(v, tuple) else f"{v:g}"
    return " ".join(f"{k}={fmt(v)}" for k, v in params.items()) or "-"


def family_table(merger: Merger) -> list[FamilyRow]:
    """Per family of ``method: auto`` for the landscape's number of experts: its grid scored."""
    rows = []
    for method in families(AUTO, len(merger.land.experts)):
        scores = [(merger.score(method, p), p) for p in points(method, len(merger.land.experts))]
        best, at = max(scores, key=lambda s: s[0])
        by_density: dict[float, float] = {}
        for value, p in scores:
            if "density" in p:
                by_density[p["density"]] = max(value, by_density.get(p["density"], 0.0))
        rows.append(FamilyRow(method, best, at, merger.score(method, {"weight": 1.0}), len(scores), by_density))
    return rows


def print_families(land: Landscape) -> None:
    start = time.time()
    merger = Merger(land)
    sources = ", ".join(f"{m} {merger.source_score(m):.3f}" for m in land.models)
    rows = family_table(merger)
    print(f"{land.name}: held-out mean over {', '.join(TASKS)}; sources: {sources}")
    print(f"  {'family':17s} {'best':>6s}  {'untuned':>7s}  {'points':>6s}  best at")
    for r in rows:
        print(f"  {r.method:17s} {r.best:6.3f}  {r.untuned:7.3f}  {r.points:6d}  {_show(r.at)}")
    for r in rows:
        if r.by_density:
            print(f"  {r.method} best by density: " + ", ".join(f"{d:g} {v:.3f}" for d, v in r.by_density.items()))
    print(f"  untuned: every parameter at its default, every weight 1.0 ({time.time() - start:.0f}s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--only", help="comma-separated landscape names (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lands = landscapes(args.cache)
    names = args.only.split(",") if args.only else list(lands)
    for name in names:
        print_families(lands[name])


if __name__ == "__main__":
    main()
