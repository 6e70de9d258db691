"""The native magnitude selection (``workers/kernels/band_scan.cpp``) built for three CPUs, timed side by
side: this machine (``native``: AVX-512 where it has it), ``x86-64-v3`` (AVX2, an AMD Zen 2/3
cluster node) and ``x86-64`` (scalar), plus the ``--baseline`` revision's source built for
x86-64-v3 (before the AVX2 path, that build ran the scalar loop). Every build selects the same cuts
of the same tensors at the same thread count in this process, alternating within each round; a
time is the best of ``--repeats``, the printed figure the median over ``--rounds``. ``vs base``
is the baseline build's seconds over this one's (> 1: faster than the baseline); every build's
cuts are checked equal.

Workload: TIES's cuts of base + 2 experts (density 0.4 and 0.6: one cut each) or Breadcrumbs'
(two cuts each), 2^22 entries (``--numel``), float32 or bfloat16.

    nice -n 5 python benchmarks/select_builds.py --dtypes float32,bfloat16 --threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from evomerge.workers.kernels import selection  # noqa: E402

from evomerge.workers.kernels import native

ARCHES = ("native", "x86-64-v3", "x86-64")


def build(arch: str, source: Path, into: Path) -> ctypes.CDLL:
    """``source`` built as workers/kernels/native.py builds it, for ``arch``, into the folder ``into``."""
    library = ctypes.CDLL(str(native._build(source, into, arch)))
    library.evomerge_select.restype = ctypes.c_int
    library.evomerge_select.argtypes = list(selection._ARGS)
    return library


def baseline_source(rev: str, into: Path) -> Path:
    """band_scan.cpp and the headers it includes, as they were at ``rev``."""
    folder = into / "baseline"
    folder.mkdir()
    for name in ("band_scan.cpp", "magnitude.h", "lanes.h", "threads.h"):
        for place in ("workers/kernels", "workers"):  # the numerics moved under workers/kernels/
            shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{place}/{name}"], capture_output=True,
                                   text=True)
            if shown.returncode == 0:
                break
        shown.check_returncode()
        text = shown.stdout
        (folder / name).write_text(text)
    return folder / "band_scan.cpp"


def select(library: ctypes.CDLL, base: torch.Tensor, experts: list[torch.Tensor],
           wants: list[tuple[int, int]], threads: int) -> tuple[list[int], list[int], list[int]]:
    slots, n = len(wants), base.numel()
    value, until, ok = (ctypes.c_uint32 * slots)(), (ctypes.c_int64 * slots)(), (ctypes.c_int * slots)()
    status = library.evomerge_select(
        native.DTYPES[base.dtype], base.data_ptr(), native.pointers(experts), len(experts), n,
        (ctypes.c_int * slots)(*[i for i, _ in wants]), (ctypes.c_int64 * slots)(*[k for _, k in wants]), slots,
        selection.sample_size(n), selection.WIDTHS[0], threads, value, until, ok)
    assert status == 0
    return list(value), list(until), list(ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 22)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--baseline", default="HEAD", help="git revision whose source is the baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="evomerge-select-"))
    (scratch / "workers").mkdir()
    builds = {arch: build(arch, ROOT / "workers" / "kernels" / "band_scan.cpp", scratch / "workers") for arch in ARCHES}
    builds["base v3"] = build("x86-64-v3", baseline_source(args.baseline, scratch), scratch)
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(args.numel, generator=g)
    theta = torch.randn(args.numel, generator=g)
    print(f"load average {os.getloadavg()[0]:.2f}; {args.numel} entries, base + 2 experts; baseline "
          f"{args.baseline} built for x86-64-v3; ns per entry (all experts' cuts), median of {args.rounds}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        base = theta.to(dtype)
        experts = [(theta + 0.002 * (shared + torch.randn(args.numel, generator=g))).to(dtype) for _ in range(2)]
        n = args.numel
        for workload, wants in (("ties", [(0, int(0.4 * n)), (1, int(0.6 * n))]),
                                ("breadcrumbs", [(0, int(0.45 * n)), (0, int(0.05 * n)),
                                                 (1, int(0.65 * n)), (1, int(0.05 * n))])):
            for threads in (int(t) for t in args.threads.split(",")):
                expected = select(builds["native"], base, experts, wants, threads)
                times: dict[str, list[float]] = {name: [] for name in builds}
                for _ in range(args.rounds):
                    for name, library in builds.items():
                        best = float("inf")
                        for _ in range(args.repeats):
                            start = time.perf_counter()
                            got = select(library, base, experts, wants, threads)
                            best = min(best, time.perf_counter() - start)
                        assert got == expected, name
                        times[name].append(best)
                median = {name: statistics.median(t) for name, t in times.items()}
                row = "  ".join(f"{name} {median[name] / n * 1e9:6.2f} ({median['base v3'] / median[name]:4.1f}x)"
                                for name in builds)
                print(f"{dtype_name:8} {workload:11} {threads}t  {row}", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}; (Nx) = the baseline x86-64-v3 build's time over "
          "this build's")


if __name__ == "__main__":
    main()
