"""Seconds per candidate on the demo: materialize / evaluate / overhead, and worker utilisation.

Runs a real search (Ray workers, lm-eval, SQLite in a temporary folder) and, in the same
run, a naive baseline at equal resources: as many processes as evomerge has workers, each
with the workers' torch threads, each rewriting the weights and calling lm-eval's
``simple_evaluate`` per candidate (what a hand-written loop does), started together after
loading. Prints both and the throughput ratio (candidates per second, same processes and
threads on both sides).

    python benchmarks/candidate_time.py [--config demo/demo.yaml] [--trials 60] [--workers 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evomerge.evaluators.batching import planned_batch  # noqa: E402
from evomerge.search.app.commands import prepare  # noqa: E402
from evomerge.search.config import load_config  # noqa: E402
from evomerge.search.controller import Controller  # noqa: E402
from evomerge.search.ledger import Ledger  # noqa: E402
from evomerge.workers.pool import WorkerPool  # noqa: E402
from evomerge.storage.repository import Repository  # noqa: E402
from evomerge.workers.worker_spec import WorkerSpec  # noqa: E402
from evomerge.workers.materialize import Materializer  # noqa: E402


def ours(config: Path, trials: int, workers: int) -> tuple[float, list[float], list[float], float]:
    """Wall seconds, per-candidate materialize and evaluate seconds, utilisation."""
    cfg = load_config(config)
    prep = prepare(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        repo = Repository(url)
        study = repo.create_study("bench", cfg.model_dump_json())
        spec = WorkerSpec(prep.folders, cfg.base_model, cfg.suite(), cfg.workers.dtype, "cpu",
                          cfg.evaluation.batch_size, cfg.workers.threads)
        pool = WorkerPool(spec, workers, cfg.workers.num_cpus, 0)
        pool.wait_ready()  # model loading is start-up cost, not per-candidate cost
        controller = Controller(cfg, repo, Ledger(url, "bench"), prep.space, lambda: pool, study.id)
        controller.pool = pool
        summary = controller.run(trials, None)
        cands = [c for c in repo.candidates(study.id) if c.materialize_s is not None]
        controller.close()
        return (summary.elapsed_s, [c.materialize_s or 0.0 for c in cands],
                [c.evaluate_s or 0.0 for c in cands], summary.utilisation)


def _naive_process(config: Path, trials: int, offset: int, ready: Any, results: Any) -> None:
    """One baseline process: load, wait for the others, then rewrite + simple_evaluate per candidate."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evomerge.evaluators.tasks import build_task_dict

    cfg = load_config(config)
    prep = prepare(cfg)
    torch.set_num_threads(cfg.workers.threads)  # the workers' threads: equal resources
    mat = Materializer(prep.folders, cfg.base_model)
    # the batch ours uses on the CPU (lm-eval's own "auto" would probe the host's memory)
    lm = HFLM(pretrained=mat.model, tokenizer=mat.tokenizer, batch_size=planned_batch(cfg.evaluation.batch_size))
    o = cfg.optimizer  # the baselines a search seeds first (search/recovery.seed_baselines)
    recipes = [r for _, r in prep.space.baselines([m.name for m in cfg.models], o.init, o.start == "best_baseline")]
    manager = TaskManager(include_defaults=False)  # fair: skip indexing lm-eval's 15k built-in tasks
    ready.wait()
    start = time.perf_counter()
    for i in range(offset, offset + trials):
        mat.apply(recipes[i % len(recipes)])
        tasks = build_task_dict(cfg.suite(), heldout=False)
        simple_evaluate(model=lm, tasks=list(tasks.values()), task_manager=manager, limit=cfg.evaluation.limit,
                        bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    results.put(time.perf_counter() - start)


def naive(config: Path, trials: int, processes: int) -> float:
    """Wall seconds per candidate of ``processes`` baseline processes run together, ``trials`` each."""
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_naive_process, args=(config, trials, i * trials, ready, results))
             for i in range(processes)]
    for proc in procs:
        proc.start()
    walls = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    return max(walls) / (trials * processes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "demo" / "demo.yaml")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--naive-trials", type=int, default=10, help="baseline candidates per process")
    args = parser.parse_args()

    wall, mat, ev, util = ours(args.config, args.trials, args.workers)
    n = len(mat)
    per_cand = wall / n
    worker_s = wall * args.workers / n  # worker-seconds each candidate occupied
    overhead = worker_s - statistics.mean(mat) - statistics.mean(ev)
    cfg = load_config(args.config)
    base = naive(args.config, args.naive_trials, args.workers)
    print(f"config {args.config}, {n} candidates, {args.workers} worker(s) x {cfg.workers.threads} thread(s)")
    print(f"  materialize  {statistics.mean(mat) * 1e3:8.1f} ms/candidate (median {statistics.median(mat) * 1e3:.1f})")
    print(f"  evaluate     {statistics.mean(ev) * 1e3:8.1f} ms/candidate (median {statistics.median(ev) * 1e3:.1f})")
    print(f"  overhead     {overhead * 1e3:8.1f} ms/candidate (controller, Ray, SQL; per worker)")
    print(f"  wall         {per_cand * 1e3:8.1f} ms/candidate -> {1 / per_cand:.2f} candidates/s")
    print(f"  utilisation  {util:8.1%} of worker time spent materializing or evaluating")
    print(f"baseline (same run, equal resources: {args.workers} process(es) x {cfg.workers.threads} thread(s)): "
          f"rewrite + lm_eval.simple_evaluate, {args.naive_trials} candidates each: {base * 1e3:.1f} ms/candidate wall")
    print(f"ratio: throughput ours / baseline at equal processes and threads = {base / per_cand:.2f}x")


if __name__ == "__main__":
    main()
