"""Search quality: does a default search find a merge above every source, and how fast?

    python benchmarks/search_quality.py [--optimizers cma,random] [--seeds 5] [--budget 120]
                                        [--landscapes demo,unseen,distractor,narrow] [--quick]
    python benchmarks/search_quality.py --landscapes layered --optimizers cma,cma@layer_group,random

For each landscape x optimizer x seed it runs a real search through the project's own path
(``load_config`` on a generated YAML, ``prepare``, ``run_search`` on a fresh SQLite file;
Ray workers, lm-eval) with the default configuration except the models, the tasks, the
budget, ``optimizer.name`` and ``optimizer.seed``, then reads the candidates back from the
database. Landscapes are built on first use (benchmarks/landscapes.py).

Noise, and the margin that "above" means: a task-mean accuracy over T tasks of n items each
has a binomial standard deviation of at most sqrt(T * 0.25 / n) / T (p = 0.5). The margin is
two of those, on the split in question: held-out for success, search for the evaluation
count. The observed gap between the search and held-out fitness of the same candidates is
printed next to it.

Per landscape x optimizer the table shows: success (the held-out fitness of the search's best
candidate beats the best source's held-out by the margin) over seeds; evaluations until the
search fitness first beat the best source's search fitness by the margin (median over seeds,
'-' when the median seed never did; baselines count as evaluations); the best candidate's
held-out (mean ± std over seeds); and that evaluation count divided by random search's from
the same run; the same count and ratio for the optimizer's own proposals; and how many of
its proposals passed the margin (for random search: the share of the box where success lies).
An optimizer the config does not accept is skipped with a note. ``layered`` is not in the
default set: one weight per model cannot succeed there by construction; it measures
per-layer genes (``cma@layer_group``) against per-model ones.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # landscapes.py; evomerge is installed

from landscapes import CACHE, TASKS, Landscape, landscapes  # noqa: E402
from evomerge.search.app.commands import prepare, run_search  # noqa: E402
from evomerge.search.config import ConfigError, load_config  # noqa: E402
from evomerge.search.ranking import best_candidate  # noqa: E402
from evomerge.storage.repository import CandidateRecord  # noqa: E402

BASELINES = ("source", "untuned")


@dataclass(frozen=True)
class Noise:
    """Worst-case binomial std of a task-mean on each split, and the margins derived from it."""

    search_std: float
    heldout_std: float

    @property
    def search_margin(self) -> float:
        return 2 * self.search_std

    @property
    def heldout_margin(self) -> float:
        return 2 * self.heldout_std


@dataclass(frozen=True)
class RunResult:
    landscape: str
    optimizer: str
    seed: int
    evaluations: int
    best_source_search: float
    best_source_heldout: float
    best_search: float
    best_heldout: float
    best_origin: str
    evals_to_success: int | None  # 1-based, baselines included; None: never within the budget
    gaps: tuple[float, ...]  # |search - held-out| fitness of every candidate scored on both
    seconds: float
    success_origin: str | None = None  # origin of that first candidate: a baseline or the optimizer
    # the same count for the first candidate the optimizer proposed past the margin (what the
    # optimizer adds to the baselines it was given; None: none within the budget)
    evolved_to_success: int | None = None
    # how many of the optimizer's own proposals passed that margin, of how many: for random
    # search, an estimate of the share of the box where success lies
    evolved_hits: int = 0
    evolved_count: int = 0
    eval_seconds: float = 0.0  # workers' evaluation seconds on the search split (materializing apart)
    documents: int = 0  # search documents scored in all (racing scores fewer)
    eval_cpu_seconds: float = 0.0  # the same in the workers' CPU seconds (robust to a loaded machine)


def noise(land: Landscape) -> Noise:
    def std(split: str) -> float:
        sizes = [sum(1 for _ in (land.task_path / "data" / f"{t}_{split}.jsonl").open()) for t in TASKS]
        return math.sqrt(sum(0.25 / n for n in sizes)) / len(sizes)

    return Noise(std("search"), std("heldout"))


@dataclass(frozen=True)
class Variant:
    """What an ``--optimizers`` entry changes in the default config:
    ``NAME[/METHOD][@GRANULARITY][~SPACE][+racing[=F:C[:K[:S]]]]``."""

    optimizer: str
    method: str | None
    granularity: str | None
    space: str | None
    racing: bool
    racing_spec: str

    @classmethod
    def parse(cls, text: str) -> "Variant":
        rest, racing, racing_spec = text.partition("+racing")
        rest, _, space = rest.partition("~")
        rest, _, granularity = rest.partition("@")
        optimizer, _, method = rest.partition("/")
        return cls(optimizer, method or None, granularity or None, space or None, bool(racing), racing_spec)


def write_config(land: Landscape, optimizer: str, seed: int, budget: int, folder: Path) -> Path:
    """The default configuration, given only models, tasks, budget and the optimizer's name and
    seed; ``preset=NAME`` names a preset instead of an optimizer. ``/METHOD`` fixes
    ``merge.method`` (``cma/ties``; the default is auto), ``@GRANULARITY`` sets
    ``merge.granularity`` (``cma/ties@layer_group``: genes per layer group; ``@model``: one per
    expert; the default is auto), ``~SPACE`` the search space (``cma~dfs``, ``cma~ps+dfs``); a
    ``+racing`` suffix (``cma+racing``) turns on multi-fidelity racing (evaluation.racing),
    ``+racing=F:C[:K[:S]]`` with first-stage fraction F, confidence C, the kept share K of a
    generation and S stages (``cma+racing=0.2:0.9``, ``cma+racing=0.2:0.5:0.25:2``)."""
    v = Variant.parse(optimizer)
    preset = v.optimizer.removeprefix("preset=") if v.optimizer.startswith("preset=") else None
    merge = {**({"method": v.method} if v.method else {}), **({"granularity": v.granularity} if v.granularity else {})}
    cfg = {
        "study": "bench",
        **({"preset": preset} if preset else {}),
        **({"space": v.space} if v.space else {}),
        **({"merge": merge} if merge else {}),
        "models": [{"name": m, "path": str(p)} for m, p in land.paths().items()],
        "base_model": land.base_model,
        "optimizer": {"seed": seed} if preset else {"name": v.optimizer, "seed": seed},
        "evaluation": {"task_paths": [str(land.task_path)], "tasks": [{"name": t} for t in TASKS],
                       "search_split": "search", "heldout_split": "heldout",
                       **({"racing": racing_settings(v.racing_spec)} if v.racing else {})},
        "budget": {"max_trials": budget},
    }
    if v.space == "ps+dfs":  # the same budget in all: half for each stage
        cfg["budget"] = {"max_trials": max(1, budget // 2)}
        cfg["dfs"] = {"max_trials": max(1, budget - budget // 2)}
    file = folder / "config.yaml"
    file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return file


def racing_settings(spec: str) -> dict[str, object]:
    """evaluation.racing for a ``+racing`` suffix: the defaults, or ``=F:C[:K[:S]]`` overriding them."""
    if not spec:
        return {"enabled": True}
    if not spec.startswith("="):
        raise ValueError(f"racing suffix {spec!r}: expected +racing or +racing=FRACTION:CONFIDENCE[:KEEP[:STAGES]]")
    values: list[float | int] = [float(x) for x in spec.removeprefix("=").split(":")]
    if len(values) not in (2, 3, 4):
        raise ValueError(f"racing suffix {spec!r}: expected +racing=FRACTION:CONFIDENCE[:KEEP[:STAGES]]")
    if len(values) == 4:
        values[3] = int(values[3])
    return {"enabled": True, **dict(zip(("fraction", "confidence", "keep", "stages"), values))}


def accepted(optimizer: str, land: Landscape) -> str | None:
    """None when the config accepts ``optimizer``, else the one-line reason."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            load_config(write_config(land, optimizer, 0, 1, Path(tmp)))
        except ConfigError as exc:
            return str(exc)
    return None


def summarise(land: Landscape, optimizer: str, seed: int, cands: list[CandidateRecord], margin: Noise,
              seconds: float, first_stage: int | None = None) -> RunResult:
    """``cands`` in evaluation order; with two stages (PS+DFS), the sources are the first
    ``first_stage`` candidates' (the DFS stage's sources include the PS model)."""
    by_id = {c.id: c for c in cands}
    sources = [c for c in cands[:first_stage] if c.origin == "source" and c.state == "complete"]
    best_src = max(sources, key=lambda c: c.fitness or 0.0)
    best_src_heldout = max(c.heldout_fitness or 0.0 for c in sources)
    best = best_candidate(cands)
    assert best is not None, "no completed candidate"
    scored = by_id[best.duplicate_of] if best.duplicate_of is not None else best
    trials = [c for c in cands if c.state in ("complete", "failed")]
    threshold = (best_src.fitness or 0.0) + margin.search_margin
    first = next((i for i, c in enumerate(trials, 1) if c.fitness is not None and c.fitness > threshold), None)
    first_origin = trials[first - 1].origin if first is not None else None
    proposed = [c for c in trials if c.origin not in BASELINES]
    hits = sum(1 for c in proposed if c.fitness is not None and c.fitness > threshold)
    evolved = next((i for i, c in enumerate(trials, 1)
                    if c.origin not in BASELINES and c.fitness is not None and c.fitness > threshold), None)
    gaps = tuple(abs(c.fitness - c.heldout_fitness) for c in cands
                 if c.fitness is not None and c.heldout_fitness is not None and c.duplicate_of is None)
    return RunResult(land.name, optimizer, seed, len(trials), best_src.fitness or 0.0, best_src_heldout,
                     best.fitness or 0.0, scored.heldout_fitness if scored.heldout_fitness is not None else math.nan,
                     best.origin, first, gaps, seconds, first_origin, evolved, hits, len(proposed),
                     sum(c.evaluate_s or 0.0 for c in cands if c.duplicate_of is None),
                     sum(c.documents or 0 for c in cands if c.duplicate_of is None),
                     sum(c.evaluate_cpu_s or 0.0 for c in cands if c.duplicate_of is None))


def run_one(land: Landscape, optimizer: str, seed: int, budget: int, workers: int, margin: Noise,
            verbose: bool) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="evomerge-sq-") as tmp:
        cfg = load_config(write_config(land, optimizer, seed, budget, Path(tmp)))
        prep = prepare(cfg)
        start = time.monotonic()
        sink = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO())
        with sink:
            repo, study_id = run_search(prep, f"sqlite:///{tmp}/search.db", cfg.study, workers, None,
                                        cfg.budget.max_trials, None)
        seconds = time.monotonic() - start
        cands = repo.candidates(study_id)
        first = None
        if cfg.space == "ps+dfs":  # both stages, the PS study's first
            record = repo.get_study(cfg.study)
            assert record is not None
            ps = repo.candidates(record.id)
            cands, first = ps + cands, len(ps)
    return summarise(land, optimizer, seed, cands, margin, seconds, first)


def _median_evals(runs: list[RunResult], evolved: bool = False) -> float:
    """Median evaluations to success (by any candidate, or by an ``evolved`` one), a seed that
    never succeeded counting as infinitely many (more than any budget: censored, so the
    median is finite only when at least half the seeds succeeded)."""
    counts = (r.evolved_to_success if evolved else r.evals_to_success for r in runs)
    return statistics.median(c if c is not None else math.inf for c in counts)


def ratio(median: float, random_median: float, budget: int) -> str:
    """``median / random_median`` as the table prints it: ``-`` when ``median`` is censored
    (unknown), ``< x`` with x = median / budget when only random search's is (random needed
    more than the budget, so the true ratio is below that)."""
    if not math.isfinite(median):
        return "-"
    return f"{median / random_median:.2f}" if math.isfinite(random_median) else f"< {median / budget:.2f}"


def table(results: list[RunResult], noises: dict[str, Noise], budget: int) -> str:
    lines = ["| landscape | optimizer | success | evals to success (median) | best held-out (mean ± std) "
             "| best held-out (median) | best source held-out | evals vs random | first success by a baseline "
             "| evolved to success (median) | evolved vs random | proposals past the margin |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.landscape, r.optimizer), []).append(r)
    for (name, opt), runs in groups.items():
        margin = noises[name].heldout_margin
        wins = sum(1 for r in runs if r.best_heldout > r.best_source_heldout + margin)
        med = _median_evals(runs)
        held = [r.best_heldout for r in runs]
        spread = statistics.stdev(held) if len(held) > 1 else 0.0
        rnd = groups.get((name, "random")) if opt != "random" else None
        evals_ratio = ratio(med, _median_evals(rnd), budget) if rnd else "-"
        by_baseline = sum(1 for r in runs if r.success_origin in BASELINES)
        evo = _median_evals(runs, evolved=True)
        evo_ratio = ratio(evo, _median_evals(rnd, evolved=True), budget) if rnd else "-"
        hits, proposed = sum(r.evolved_hits for r in runs), sum(r.evolved_count for r in runs)
        lines.append(f"| {name} | {opt} | {wins}/{len(runs)} | {'-' if math.isinf(med) else f'{med:g}'} | "
                     f"{statistics.mean(held):.3f} ± {spread:.3f} | {statistics.median(held):.3f} | "
                     f"{runs[0].best_source_heldout:.3f} | {evals_ratio} | "
                     f"{by_baseline}/{len(runs)} | {'-' if math.isinf(evo) else f'{evo:g}'} | {evo_ratio} | "
                     f"{hits}/{proposed} |")
    return "\n".join(lines)


def racing_table(results: list[RunResult], noises: dict[str, Noise]) -> str:
    """Each ``X+racing`` beside ``X`` of the same run: held-out quality and evaluation seconds
    (the workers' wall-clock and CPU seconds of scoring; the saving is counted in CPU seconds,
    which a loaded machine does not inflate)."""
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.landscape, r.optimizer), []).append(r)
    lines = ["| landscape | optimizer | success | best held-out (mean ± std) | evaluation s per search (mean) "
             "| evaluation CPU s per search (mean) | documents per search (mean) | evaluation CPU s saved |",
             "|---|---|---|---|---|---|---|---|"]
    for (name, opt), runs in groups.items():
        plain = opt.partition("+racing")[0]
        if plain == opt or (name, plain) not in groups:
            continue
        full = groups[(name, plain)]
        for label, rs in ((plain, full), (opt, runs)):
            held = [r.best_heldout for r in rs]
            wins = sum(1 for r in rs if r.best_heldout > r.best_source_heldout + noises[name].heldout_margin)
            cpu, base = (statistics.mean(r.eval_cpu_seconds for r in x) for x in (rs, full))
            saved = f"{1 - cpu / base:.0%}" if rs is runs and base > 0 else "-"  # runs of old files: no CPU
            lines.append(f"| {name} | {label} | {wins}/{len(rs)} | {statistics.mean(held):.3f} ± "
                         f"{statistics.stdev(held) if len(held) > 1 else 0.0:.3f} | "
                         f"{statistics.mean(r.eval_seconds for r in rs):.1f} | {cpu:.1f} | "
                         f"{statistics.mean(r.documents for r in rs):.0f} | {saved} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def noise_lines(results: list[RunResult], noises: dict[str, Noise]) -> str:
    out = []
    for name, nz in noises.items():
        gaps = [g for r in results if r.landscape == name for g in r.gaps]
        seen = (f"; observed |search - held-out| of the same candidates: mean {statistics.mean(gaps):.3f}, "
                f"max {max(gaps):.3f} (n={len(gaps)})") if gaps else ""
        out.append(f"- {name}: binomial std of a task-mean <= {nz.search_std:.3f} (search), "
                   f"{nz.heldout_std:.3f} (held-out); margins {nz.search_margin:.3f} / {nz.heldout_margin:.3f}{seen}")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default="cma,random",
                        help="comma-separated optimizer.name values, or preset=NAME for a preset's defaults; "
                             "NAME@GRANULARITY also sets merge.granularity (cma@layer_group); "
                             "NAME+racing turns on multi-fidelity racing (cma+racing)")
    parser.add_argument("--landscapes", default="demo,unseen,distractor,narrow",
                        help="comma-separated, of demo, unseen, distractor, narrow, layered, rescaled, opposed")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=120, help="evaluations per search (baselines included)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, budget 24")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--raw", type=Path, help="also write every run's result here (JSON lines); runs "
                        "already in the file are not run again (an interrupted run resumes)")
    parser.add_argument("--verbose", action="store_true", help="show each search's progress")
    parser.add_argument("--table-from", type=Path, help="print the table of a --raw file instead of searching")
    args = parser.parse_args()
    # Each search starts its own local Ray: without this, ray.init joins (or fails on) whatever
    # cluster /tmp/ray/ray_current_cluster names, e.g. another user's or a test's.
    os.environ.setdefault("RAY_ADDRESS", "local")
    if args.quick:
        args.seeds, args.budget = 1, 24
    every = landscapes(args.cache)
    names = [n.strip() for n in args.landscapes.split(",") if n.strip()]
    unknown = [n for n in names if n not in every]
    if unknown:
        print(f"--landscapes: unknown {unknown[0]!r} (known: {', '.join(every)})", file=sys.stderr)
        return 2
    chosen = [every[n] for n in names]
    optimizers = []
    for opt in (o.strip() for o in args.optimizers.split(",") if o.strip()):
        reason = accepted(opt, chosen[0])
        if reason:
            print(f"skipping optimizer {opt!r}: {reason}", file=sys.stderr)
        else:
            optimizers.append(opt)
    if not optimizers:
        print("--optimizers: the config accepts none of them", file=sys.stderr)
        return 2
    noises = {land.name: noise(land) for land in chosen}
    if args.table_from:  # the table of an earlier (maybe interrupted) run's --raw file
        rows = [json.loads(line) for line in args.table_from.open()]
        results = [RunResult(**{**r, "gaps": tuple(r["gaps"])}) for r in rows if r["landscape"] in noises]
        report(results, noises, args)
        return 0
    results: list[RunResult] = []
    if args.raw and args.raw.exists():  # a rerun of an interrupted run: what it already has counts
        results = [RunResult(**{**r, "gaps": tuple(r["gaps"])}) for r in map(json.loads, args.raw.open())
                   if r["landscape"] in noises and r["optimizer"] in optimizers]
    done = {(r.landscape, r.optimizer, r.seed) for r in results}
    for seed in range(args.seeds):  # seeds outermost: an interrupted run still covers every cell
        for land in chosen:
            for opt in optimizers:
                if (land.name, opt, seed) in done:
                    continue
                r = run_one(land, opt, seed, args.budget, args.workers, noises[land.name], args.verbose)
                results.append(r)
                print(f"{land.name} {opt} seed {seed}: best held-out {r.best_heldout:.3f} ({r.best_origin}) vs "
                      f"source {r.best_source_heldout:.3f}; evals to success {r.evals_to_success or '-'} "
                      f"({r.success_origin or '-'}); "
                      f"{r.seconds:.0f}s", flush=True)
                if args.raw:
                    with args.raw.open("a") as f:
                        f.write(json.dumps(asdict(r)) + "\n")
    report(results, noises, args)
    return 0


def report(results: list[RunResult], noises: dict[str, Noise], args: argparse.Namespace) -> None:
    seeds = len({r.seed for r in results})
    print(f"\nSearch quality: {seeds} seed(s), {args.budget} evaluations each, {args.workers} workers; "
          "success = held-out beats the best source by the margin")
    print(noise_lines(results, noises))
    print()
    print(table(results, noises, args.budget))
    racing = racing_table(results, noises)
    if racing:
        print("\nMulti-fidelity racing against full evaluation, same run (evaluation seconds: the workers' "
              "wall-clock and CPU time scoring the search split, summed over the search)\n")
        print(racing)


if __name__ == "__main__":
    sys.exit(main())
