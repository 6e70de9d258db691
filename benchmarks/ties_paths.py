"""TIES and Breadcrumbs(-TIES) on the CPU: the one-pass native kernel (``band_merge.cpp``) against
the native cuts (``band_scan.cpp``) followed by the compiled merge (``fused._merge``), and with
``--device-cuts`` the portable cuts (``fused.device_cuts``, what a CPU without the native build
takes) followed by the same compiled merge. Issue 19's rule: a CPU-only kernel stays only where it
beats the compiled path by 1.5x or more, measured in one run at equal resources.

Every path runs in this process on the same tensors at the same thread count, alternating within
each round; a time is the best of ``--repeats`` after a warm-up (which also compiles), and the
printed figure the median over ``--rounds``. ``ratio`` is compiled seconds / one-pass seconds
(> 1: the one pass is faster); every output is checked equal to the compiled path's, bit for bit.

Sizes: ``matrix`` is one 4096x11008 matrix (a 7 B MLP projection), ``100m`` the 110 M Llama of
benchmarks/merge_scaling.py; base + 2 experts, θ_i = θ_b + 0.002·(shared + own noise).

    nice -n 5 python benchmarks/ties_paths.py --sizes matrix,100m --threads 1,2 --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from evomerge.workers.kernels import streaming  # noqa: E402

from evomerge.workers.kernels import fused, magnitude_merge, selection, sparsify
from evomerge.workers.mergekit import SHARED_METHODS  # noqa: E402
from merge_scaling import build_sources  # noqa: E402
from merge_throughput import PER_EXPERT  # noqa: E402

OPS = {"ties": (True, False), "breadcrumbs": (False, True), "breadcrumbs_ties": (True, True)}  # (election, gamma)


def trims_of(op: str, n: int) -> list[sparsify.Trim]:
    density = PER_EXPERT["density"][:2]
    if OPS[op][1]:
        return sparsify.breadcrumbs_trims(density, PER_EXPERT["gamma"][:2], n)
    return sparsify.ties_trims(density, n)


def one_pass(op: str, base: torch.Tensor, experts: list[torch.Tensor], out: torch.Tensor) -> None:
    """The native one pass (magnitude_merge.merge); tensors it does not take, the other path."""
    consensus, weight, normalize = OPS[op][0], PER_EXPERT["weight"][:2], SHARED_METHODS.get(op, False)
    if base.numel() < selection.NATIVE_MIN:
        compiled(op, base, experts, out)
    elif not magnitude_merge.merge(base, experts, trims_of(op, base.numel()), weight,
                                   coeff=streaming._sum_factor(weight, 1.0, normalize, consensus), scale=1.0,
                                   consensus=consensus, normalize=normalize, out=out):
        raise RuntimeError("the one-pass kernel declined (built without AVX-512, or a sample misled)")


def compiled(op: str, base: torch.Tensor, experts: list[torch.Tensor], out: torch.Tensor,
             cuts: str = "native") -> None:
    """The cuts (native band_scan, or ``device``: fused.device_cuts), then the compiled fused._merge."""
    consensus, weight, normalize = OPS[op][0], PER_EXPERT["weight"][:2], SHARED_METHODS.get(op, False)
    fused.trimmed_merge(base, experts, weight, trims_of(op, base.numel()), scale=1.0,
                        coeff=streaming._sum_factor(weight, 1.0, normalize, consensus), consensus=consensus,
                        normalize=normalize, out=out, native_path=cuts == "native")


def best(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up (compiles on first use)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def tensors(size: str, dtype: torch.dtype) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    if size == "matrix":
        g = torch.Generator().manual_seed(0)
        base = torch.randn(4096, 11008, generator=g).mul_(0.02)
        shared = torch.randn(4096, 11008, generator=g).mul_(0.002)
        experts = [torch.randn(4096, 11008, generator=g).mul_(0.002).add_(shared).add_(base).to(dtype) for _ in range(2)]
        return [(base.to(dtype), experts)]
    sources = build_sources(size, dtype)
    return [(sources["base"][k], [sources["expert_a"][k], sources["expert_b"][k]]) for k in sources["base"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="matrix,100m", help="comma-separated of matrix, 20m, 100m, 265m")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--repeats", type=int, default=2, help="timings per round after a warm-up (the best counts)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the median counts)")
    parser.add_argument("--device-cuts", action="store_true",
                        help="also time fused.device_cuts + the compiled merge (the path without native kernels)")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for size in args.sizes.split(","):
            pairs = tensors(size, dtype)
            outs = [torch.empty_like(b) for b, _ in pairs]
            numel = sum(o.numel() for o in outs)
            for threads in [int(t) for t in args.threads.split(",")]:
                torch.set_num_threads(threads)
                print(f"\n{size} ({numel / 1e6:.1f} M entries), {dtype_name}, {threads} thread(s), "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
                head = f"  {'operator':17s} {'one-pass ns/p':>13s} {'compiled ns/p':>13s} {'ratio':>6s}"
                print(head + (f" {'dev.cuts ns/p':>13s} {'dev/compiled':>12s}" if args.device_cuts else "") + "  equal")
                for op in args.ops.split(","):
                    paths: dict[str, Callable[[], None]] = {
                        "one": lambda: [one_pass(op, b, e, o) for (b, e), o in zip(pairs, outs)],
                        "compiled": lambda: [compiled(op, b, e, o) for (b, e), o in zip(pairs, outs)]}
                    if args.device_cuts:
                        paths["device"] = lambda: [compiled(op, b, e, o, cuts="device") for (b, e), o in zip(pairs, outs)]
                    times: dict[str, list[float]] = {name: [] for name in paths}
                    results = {}
                    for _ in range(args.rounds):
                        for name, fn in paths.items():
                            times[name].append(best(fn, args.repeats))
                            results[name] = [o.clone() for o in outs] if _ == 0 else results[name]
                    equal = all(all(torch.equal(a, b) for a, b in zip(results[name], results["compiled"]))
                                for name in results)
                    med = {name: statistics.median(t) for name, t in times.items()}
                    line = (f"  {op:17s} {med['one'] / numel * 1e9:13.2f} {med['compiled'] / numel * 1e9:13.2f} "
                            f"{med['compiled'] / med['one']:5.2f}x")
                    if args.device_cuts:
                        line += f" {med['device'] / numel * 1e9:13.2f} {med['device'] / med['compiled']:11.2f}x"
                    print(line + f"  {'yes' if equal else 'NO'}", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; ratio = compiled / one-pass seconds "
          "(issue 19 keeps the one-pass kernel only at >= 1.5x)")


if __name__ == "__main__":
    main()
