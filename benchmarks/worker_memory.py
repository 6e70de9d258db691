"""Memory of N workers on one node: are the sources resident once?

Starts N real worker processes at once (spawned, one thread each), each holding what an
evomerge worker holds: a :class:`Materializer` (its sources and one working model) that has
materialized one DARE-TIES candidate. With all N alive, it reads each process's
``/proc/PID/smaps_rollup``: RSS counts every page a process maps, shared or not; PSS
divides each shared page among the processes that map it, so the sum of PSS over the
workers is what the node really holds.

Two ways of holding sources, measured in the same run at equal resources (same N
processes, same threads, same models):
  mapped   evomerge's: safetensors files mapped read-only (private, copy-on-write, never
           written), so the page cache holds each source once for every worker on the node;
  private  each worker copies its sources into its own memory (what a loader that reads
           files into buffers costs).

    python benchmarks/worker_memory.py [--size small|100m] [--workers 1,2,4]

Sources are shared only when the files hold the worker's dtype (a bf16 file in a float32
worker is converted: a private copy) and the worker computes on the CPU.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_throughput import SIZES, build_models, make_recipe  # noqa: E402

MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def _smaps(pid: int) -> dict[str, int]:
    """Bytes of process ``pid``: RSS and PSS in all, its anonymous (private) memory, and the
    PSS of the clean pages of its .safetensors mappings (Linux /proc/PID/smaps).

    The working model's parameters may be copy-on-write views of the base's file (as
    transformers loads it): pages it rewrote are anonymous, counted there, not as sources."""
    out = {"rss": 0, "pss": 0, "anon": 0, "sources": 0}
    path, pss = "", 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if MAPPING.match(line):
            fields = line.split(maxsplit=5)
            path = fields[5] if len(fields) == 6 else ""
            continue
        key, _, value = line.partition(":")
        kib = int(value.split()[0]) * 1024 if value.strip().endswith("kB") else 0
        if key == "Rss":
            out["rss"] += kib
        elif key == "Pss":
            out["pss"] += kib
            pss = kib
        elif key == "Anonymous":  # follows Pss in each mapping's block
            out["anon"] += kib
            out["sources"] += pss - kib if path.endswith(".safetensors") else 0
    return out


def _worker(folders: dict[str, Path], private: bool, ready: mp.Queue, done: mp.Event) -> None:  # type: ignore[type-arg]
    import os

    import torch

    from evomerge.workers.materialize import Materializer

    torch.set_num_threads(1)
    mat = Materializer(folders, "base")
    if private:
        mat.sources = {name: {k: t.clone() for k, t in tensors.items()} for name, tensors in mat.sources.items()}
    mat.apply(make_recipe("dare_ties"))
    ready.put(os.getpid())
    done.wait()


def measure(folders: dict[str, Path], workers: int, private: bool) -> list[dict[str, int]]:
    """smaps of ``workers`` processes alive at once."""
    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_worker, args=(folders, private, ready, done)) for _ in range(workers)]
    for p in procs:
        p.start()
    try:
        pids = [ready.get(timeout=1800) for _ in procs]
        return [_smaps(pid) for pid in pids]
    finally:
        done.set()
        for p in procs:
            p.join(timeout=120)


def _gib(n: float) -> str:
    return f"{n / 2**30:6.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="100m")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-bench"))
    args = parser.parse_args()
    folders = build_models(args.workdir, args.size)
    source_bytes = sum(f.stat().st_size for folder in folders.values() for f in folder.glob("*.safetensors"))
    model_bytes = source_bytes / len(folders)
    print(f"{len(folders)} sources of {args.size}: {_gib(source_bytes)} GiB on disk (float32); "
          f"working model {_gib(model_bytes)} GiB\n")
    print(f"{'mode':8} {'N':>2} {'RSS/worker':>10} {'PSS/worker':>10} {'sum PSS':>8} {'anon PSS':>8} "
          f"{'file PSS':>8}  (GiB, summed over the N workers; file PSS: clean pages of their .safetensors mappings)")
    totals: dict[tuple[str, int], float] = {}
    for n in (int(x) for x in args.workers.split(",")):
        for mode in ("mapped", "private"):
            rows = measure(folders, n, mode == "private")
            total = {k: sum(r[k] for r in rows) for k in rows[0]}
            totals[(mode, n)] = total["pss"]
            print(f"{mode:8} {n:>2} {_gib(total['rss'] / n):>10} {_gib(total['pss'] / n):>10} "
                  f"{_gib(total['pss']):>8} {_gib(total['anon']):>8} {_gib(total['sources']):>8}"
                  + (f"  sources resident {total['sources'] / source_bytes:.2f}x" if mode == "mapped" else ""))
    print()
    for n in sorted({n for _, n in totals}):
        print(f"N={n}: node memory, private / mapped = {totals[('private', n)] / totals[('mapped', n)]:.2f}")


if __name__ == "__main__":
    main()
