"""Memory and time per DFS (layer route) candidate next to a PS (merge) candidate, one run.

One in-process worker (Materializer + CandidateModel + Evaluator, torch threads as in
``workers.threads``) on the demo models scores, in turn:

- ``ps``: random genomes of the demo's PS space (merges materialized in place);
- ``dfs``: x0 and random genomes of a RouteSpace over (base, cipher_a, cipher_b), repeats 2;
- ``ps+dfs``: the same with a merged member ``ps`` (the demo method at genes 0.5) as head.

Per candidate it times ``CandidateModel.apply`` (materialize) and ``Evaluator.score`` on the
search split. The first route apply of a collection (router build + head materialization) is
a one-off, timed apart. "Extra param bytes": storage of the candidate's parameters that is
neither a loaded source tensor nor the working model's own parameters (routes: ~0). Peak
RSS growth per kind uses /proc/self/status VmHWM, reset per candidate through
/proc/self/clear_refs; slopes of evaluate time and peak RSS growth over hops (least squares)
estimate per-hop compute and activation/KV-cache memory, shown next to the DFS space's own
bytes-per-hop bound (``RouteLimits.bytes_per_hop``).

    python benchmarks/route_time.py [--config demo/demo.yaml] [--candidates 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers progress bars (lm-eval passes disable= itself)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evomerge.evaluators.harness import Evaluator  # noqa: E402
from evomerge.search.app.commands import prepare  # noqa: E402
from evomerge.search.config import SearchConfig, load_config  # noqa: E402
from evomerge.search.dfs_space import RouteSpace  # noqa: E402
from evomerge.search.stages import PS_MEMBER, ps_space, route_space  # noqa: E402
from evomerge.workers.candidate_model import CandidateModel  # noqa: E402
from evomerge.workers.materialize import Materializer  # noqa: E402
from evomerge.workers.recipe import Recipe  # noqa: E402


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


PROCESS_PEAK = [0]  # the largest VmHWM seen before any reset


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    PROCESS_PEAK[0] = max(PROCESS_PEAK[0], _status_kb("VmHWM"))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Kind:
    name: str
    hops: list[int] = field(default_factory=list)
    mat_s: list[float] = field(default_factory=list)
    eval_s: list[float] = field(default_factory=list)
    extra: list[int] = field(default_factory=list)
    peak: list[int] = field(default_factory=list)  # per candidate: VmHWM - VmRSS at its start
    one_off_s: float | None = None


def extra_param_bytes(model: torch.nn.Module, mat: Materializer) -> int:
    """Bytes of unique parameter storages that are neither sources nor working parameters."""
    known = {t.untyped_storage().data_ptr() for src in mat.sources.values() for t in src.values()}
    known |= {p.untyped_storage().data_ptr() for p in mat.params.values()}
    extra: dict[int, int] = {}
    for p in model.parameters():
        s = p.untyped_storage()
        if s.data_ptr() not in known:
            extra[s.data_ptr()] = s.nbytes()
    return sum(extra.values())


def run_kind(kind: Kind, recipes: list[Recipe], cand: CandidateModel, ev: Evaluator, layers: int) -> None:
    for recipe in recipes:
        rss0 = _status_kb("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        cand.apply(recipe)
        t1 = time.perf_counter()
        ev.score()
        t2 = time.perf_counter()
        kind.peak.append(max(_status_kb("VmHWM") - rss0, 0))
        kind.mat_s.append(t1 - t0)
        kind.eval_s.append(t2 - t1)
        kind.hops.append(len(recipe.route) if recipe.kind == "route" else layers)
        kind.extra.append(extra_param_bytes(cand.model, cand.materializer))


def routes(space: RouteSpace, rng: np.random.Generator, n: int) -> list[Recipe]:
    """x0 and ``n`` random genomes, paths the space rejects (empty) skipped."""
    genomes = [space.x0()] + [list(rng.random(space.dim)) for _ in range(n)]
    return [r for r in (space.decode(g) for g in genomes) if space.reject(r) is None]


def dfs_config(cfg: SearchConfig, space: str, head: str, repeats: int) -> SearchConfig:
    """``cfg`` as a ``space`` study over (head, *experts), whatever the file's dfs.models."""
    dfs = cfg.dfs.model_copy(update={"repeats": repeats, "models": [head, *cfg.experts]})
    return cfg.model_copy(update={"space": space, "dfs": dfs})


def slope(xs: list[int], ys: list[float]) -> float:
    return float(np.polyfit(xs, ys, 1)[0]) if len(set(xs)) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "demo" / "demo.yaml")
    parser.add_argument("--candidates", type=int, default=20, help="random genomes per kind")
    parser.add_argument("--repeats", type=int, default=2, help="DFS layout repetitions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    cfg = load_config(args.config)
    prep = prepare(cfg)
    torch.set_num_threads(cfg.workers.threads)
    rng = np.random.default_rng(args.seed)
    rss_start = _status_kb("VmRSS")
    mat = Materializer(prep.folders, cfg.base_model, getattr(torch, cfg.workers.dtype))
    cand = CandidateModel(mat)
    ev = Evaluator(cfg.suite(), mat.model, mat.tokenizer, cfg.evaluation.batch_size)
    ev.score()  # warm-up: first-call costs belong to no kind
    rss_loaded = _status_kb("VmRSS")
    source_bytes = sum(t.untyped_storage().nbytes() for s in mat.sources.values() for t in s.values())
    working_bytes = sum(p.untyped_storage().nbytes() for p in mat.params.values())

    ps = ps_space(cfg, prep.folders)
    ps_kind = Kind("ps")
    run_kind(ps_kind, [ps.decode(list(rng.random(ps.dim))) for _ in range(args.candidates)], cand, ev, mat.num_layers)

    kinds = [ps_kind]
    member = ps.decode([0.5] * ps.dim)
    for name, head_model, members in (("dfs", cfg.base_model, {}), ("ps+dfs", PS_MEMBER, {PS_MEMBER: member})):
        space = route_space(dfs_config(cfg, name, head_model, args.repeats), prep.folders, members)
        assert space.models[0] == head_model, space.models
        kind = Kind(name)
        t0 = time.perf_counter()
        cand.apply(space.identity())  # router build + head (source or merged member) materialization
        kind.one_off_s = time.perf_counter() - t0
        run_kind(kind, routes(space, rng, args.candidates), cand, ev, mat.num_layers)
        kinds.append(kind)
        bytes_per_hop_bound = space.limits.bytes_per_hop
    cand.release()

    ps_eval = statistics.mean(ps_kind.eval_s)
    print(f"config {args.config}: {mat.num_layers} layers/model, DFS repeats {args.repeats}, "
          f"{torch.get_num_threads()} torch thread(s), batch {cfg.evaluation.batch_size}, seed {args.seed}")
    head = (f"{'kind':<7}| {'cands':>5} | {'mean hops':>9} | {'materialize ms':>14} | {'evaluate ms':>11} | "
            f"{'eval ms/hop':>11} | {'extra param B':>13} | {'ratio vs PS':>11}")
    print(head)
    print("-" * len(head))
    for k in kinds:
        per_hop = statistics.mean(e / h for e, h in zip(k.eval_s, k.hops)) * 1e3
        print(f"{k.name:<7}| {len(k.hops):>5} | {statistics.mean(k.hops):>9.1f} | "
              f"{statistics.mean(k.mat_s) * 1e3:>14.2f} | {statistics.mean(k.eval_s) * 1e3:>11.1f} | "
              f"{per_hop:>11.2f} | {max(k.extra):>13d} | {statistics.mean(k.eval_s) / ps_eval:>10.2f}x")
    print("(materialize/evaluate: means per candidate; extra param B: max over the kind's candidates; "
          "PS hops = model depth)")
    for k in kinds[1:]:
        print(f"{k.name}: one-off first apply (router build + head materialize) {k.one_off_s * 1e3:.1f} ms; "
              f"hops {min(k.hops)}..{max(k.hops)}; evaluate slope {slope(k.hops, k.eval_s) * 1e3:.2f} ms/hop; "
              f"peak RSS slope {slope(k.hops, [float(p) for p in k.peak]) / 2**20:.2f} MiB/hop")
    print(f"DFS space bound (RouteLimits.bytes_per_hop, full context): {bytes_per_hop_bound / 2**20:.2f} MiB/hop")
    peaks = ", ".join(f"{k.name} {max(k.peak) / 2**20:.1f} MiB (mean {statistics.mean(k.peak) / 2**20:.1f})"
                      for k in kinds)
    print(f"peak RSS growth per candidate over RSS at its start: {peaks}"
          f"{'' if reset_peak() else ' [clear_refs unavailable: VmHWM is cumulative]'}")
    print(f"RSS: {rss_start / 2**20:.0f} MiB before load, {rss_loaded / 2**20:.0f} MiB loaded + warm "
          f"(sources {source_bytes / 2**20:.2f} MiB, working model {working_bytes / 2**20:.2f} MiB), "
          f"process peak RSS {PROCESS_PEAK[0] / 2**20:.0f} MiB; wall {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
