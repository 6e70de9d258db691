"""The held-out landscape of examples/real-hard: a task-arithmetic grid, the sources and the
untuned merges, scored on the held-out split, printed as markdown tables.

    nice -n 10 python examples/real-hard/grid.py DIR [--weights 0,0.25,...] [--distractor 0.25,0.5,1]

DIR is a folder written by build.py. Every point is merged by evomerge's own engine
(workers/materialize.py) and scored by its own lm-eval adapter (evaluators/harness.py) on
the ``heldout`` split, as the search's held-out re-scoring does:

- the sources: base, cipher_a, cipher_b, upper;
- the untuned merges: task arithmetic at weight 1 each, the uniform soup of the three
  experts, DARE-TIES at density 0.5 and weight 1 each (the search scores every family's
  untuned merge on held-out too: ``evomerge status``);
- θ_base + w_a·δ_a + w_b·δ_b for w_a, w_b in ``--weights`` (upper at 0), then upper at each
  of ``--distractor`` added to (1, 1) and to the best grid point.

Scores are cached in DIR/grid.jsonl by recipe hash: an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the example is offline throughout
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from evomerge.evaluators.harness import Evaluator  # noqa: E402
from evomerge.search.config import load_config  # noqa: E402
from evomerge.workers.materialize import Materializer  # noqa: E402
from evomerge.workers.recipe import MergeRecipe, SourceRecipe  # noqa: E402

Recipe = SourceRecipe | MergeRecipe
EXPERTS = ("cipher_a", "cipher_b", "upper")


def task_arithmetic(weights: dict[str, float], label: str) -> Recipe:
    used = {m: w for m, w in weights.items() if w}
    if not used:
        return SourceRecipe(source="base", label=label)
    return MergeRecipe(method="task_arithmetic", base="base", models=tuple(used), label=label,
                       params={"weight": {m: (w,) for m, w in used.items()}})


def dare_ties(density: float, weight: float, experts: tuple[str, ...], label: str) -> Recipe:
    return MergeRecipe(method="dare_ties", base="base", models=experts, label=label, seed=0,
                       params={"density": {m: (density,) for m in experts}, "weight": {m: (weight,) for m in experts}})


def fixed_points() -> list[Recipe]:
    points: list[Recipe] = [SourceRecipe(source=m, label=f"source {m}") for m in ("base", *EXPERTS)]
    points.append(task_arithmetic({m: 1.0 for m in EXPERTS}, "untuned task arithmetic (w 1 each)"))
    third = round(1 / 3, 6)
    points.append(MergeRecipe(method="linear", base="base", models=EXPERTS, normalize=False,
                              params={"weight": {m: (third,) for m in EXPERTS}}, label="untuned soup (1/3 each)"))
    points.append(dare_ties(0.5, 1.0, EXPERTS, "untuned DARE-TIES (d 0.5, w 1 each)"))
    return points


class Scorer:
    """Merges and scores recipes on the held-out split, caching by recipe hash."""

    def __init__(self, folder: Path, limit: int | None) -> None:
        cfg = load_config(folder / "search.yaml")
        self.folder, self.limit = folder, limit
        self.tasks = [t.name for t in cfg.evaluation.tasks]
        self.materializer = Materializer({m.name: Path(m.path) for m in cfg.models}, cfg.base_model)
        suite = dataclasses.replace(cfg.suite(), heldout_limit=limit)
        self.evaluator = Evaluator(suite, self.materializer.model, self.materializer.tokenizer)
        self.cache_file = folder / ("grid.jsonl" if limit is None else f"grid-limit{limit}.jsonl")
        self.cache: dict[str, dict[str, float]] = {}
        if self.cache_file.exists():
            for line in self.cache_file.read_text().splitlines():
                row = json.loads(line)
                self.cache[row["hash"]] = row["scores"]

    def __call__(self, recipe: Recipe) -> dict[str, float]:
        if recipe.content_hash not in self.cache:
            start = time.perf_counter()
            self.materializer.apply(recipe)
            scores = self.evaluator.score(heldout=True)
            self.cache[recipe.content_hash] = scores
            with self.cache_file.open("a") as f:
                f.write(json.dumps({"hash": recipe.content_hash, "label": recipe.label, "scores": scores}) + "\n")
            print(f"{recipe.label}: mean {mean(scores):.3f} ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr, flush=True)
        return self.cache[recipe.content_hash]

    def documents(self) -> int:
        """Held-out documents scored in the smallest task (build.py's data files, cut by --limit)."""
        counts = [len((self.folder / "tasks" / "data" / f"{name}_heldout.jsonl").read_text().splitlines())
                  for name in self.tasks]
        return min(counts + ([self.limit] if self.limit else []))


def mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def row(label: str, scores: dict[str, float], tasks: list[str]) -> str:
    return f"| {label} | " + " | ".join(f"{scores[t]:.3f}" for t in tasks) + f" | **{mean(scores):.3f}** |"


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a folder written by build.py")
    parser.add_argument("--weights", type=floats, default=floats("0,0.25,0.5,0.75,1,1.25,1.5"),
                        help="grid values of w_a and w_b (comma-separated)")
    parser.add_argument("--distractor", type=floats, default=floats("0.25,0.5,1"),
                        help="weights of upper added to (1, 1) and to the best grid point")
    parser.add_argument("--limit", type=int, help="held-out words per task, a seeded sample (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    score = Scorer(args.folder, args.limit)
    tasks = score.tasks
    fixed = [(r.label, score(r)) for r in fixed_points()]
    grid = {(wa, wb): score(task_arithmetic({"cipher_a": wa, "cipher_b": wb}, f"TA w_a {wa} w_b {wb}"))
            for wa in args.weights for wb in args.weights}
    best_ab, best = max(grid.items(), key=lambda item: mean(item[1]))
    with_upper = []
    for wa, wb in dict.fromkeys([(1.0, 1.0), best_ab]):
        for wd in args.distractor:
            label = f"TA w_a {wa} w_b {wb} w_upper {wd}"
            with_upper.append((label, score(task_arithmetic({"cipher_a": wa, "cipher_b": wb, "upper": wd}, label))))

    header = "| candidate | " + " | ".join(tasks) + " | mean |\n|---|" + "---|" * (len(tasks) + 1)
    print(f"### Held-out ({score.documents()} words per task)\n\n{header}")
    for label, scores in fixed:
        print(row(label, scores, tasks))
    print(row(f"best grid point: TA w_a {best_ab[0]} w_b {best_ab[1]} (upper 0)", best, tasks))
    for label, scores in with_upper:
        print(row(label, scores, tasks))
    print(f"\n### Task-arithmetic grid, upper at 0: held-out mean over {len(tasks)} tasks (rows w_a, columns w_b)\n")
    print("| w_a \\ w_b | " + " | ".join(f"{w:g}" for w in args.weights) + " |\n|---|"
          + "---|" * len(args.weights))
    for wa in args.weights:
        cells = [f"{mean(grid[wa, wb]):.3f}" for wb in args.weights]
        print(f"| {wa:g} | " + " | ".join(f"**{c}**" if (wa, wb) == best_ab else c
                                         for c, wb in zip(cells, args.weights)) + " |")

    # the bar: binomial standard deviation of a mean over T tasks of n documents, at p = 0.5 (its largest)
    n, t = score.documents(), len(tasks)
    sigma = math.sqrt(t * 0.25 / n) / t
    sources = [(label, s) for label, s in fixed if label.startswith("source")]
    best_source = max(sources, key=lambda item: mean(item[1]))
    untuned = [(label, s) for label, s in fixed if label.startswith("untuned")]
    gap = mean(best) - mean(best_source[1])
    print(f"\nNoise: σ of a held-out mean ≤ sqrt({t}·0.25/{n})/{t} = {sigma:.4f}.")
    print(f"Best grid point {mean(best):.3f} vs best source ({best_source[0]}) {mean(best_source[1]):.3f}: "
          f"+{gap:.3f} = {gap / sigma:.1f} σ.")
    for label, s in untuned:
        print(f"Best grid point vs {label} {mean(s):.3f}: +{mean(best) - mean(s):.3f} = "
              f"{(mean(best) - mean(s)) / sigma:.1f} σ.")


if __name__ == "__main__":
    main()
