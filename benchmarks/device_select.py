"""The k-th largest |δ| of one tensor on a device: ``kthvalue`` (what ``fused.device_cuts``
uses today on a GPU, for TIES and Breadcrumbs) against a ``topk`` of the smaller side.

Why it is asked: on CUDA ``kthvalue`` selects each slice within one thread block, and a whole
7 B matrix is one slice (pytorch/pytorch#75599 reports 0.68 s for 10^8 entries, 20x a full
sort); ``topk`` has a multi-block radix pass (pytorch/pytorch#71081). Which one wins, and by how
much, needs a GPU: this script prints both, their ratio and whether they agree, on whatever
device it is given (the GPU check runs it on CUDA; on the CPU it is a smoke test of the same
code). Scratch: ``kthvalue`` copies the tensor; ``topk`` of the smaller side holds at most half
of it as values and int64 indices (6 bytes per entry of the input).

    python benchmarks/device_select.py [--device cuda] [--rows 11008] [--cols 4096] [--density 0.2,0.5,0.9]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
from torch import Tensor


def kth_by_kthvalue(bits: Tensor, k: int) -> Tensor:
    """The k-th largest entry (a 0-d tensor on the device), as ``fused._cut`` selects it."""
    return torch.kthvalue(bits, bits.numel() - k + 1).values


def kth_by_topk(bits: Tensor, k: int) -> Tensor:
    """The same entry from a ``topk`` of the smaller side: the least of the k largest, or the
    greatest of the n - k + 1 smallest."""
    n = bits.numel()
    if k <= n - k + 1:
        return torch.topk(bits, k, sorted=False).values.min()
    return torch.topk(bits, n - k + 1, largest=False, sorted=False).values.max()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_seconds(fn: Callable[[], Tensor], device: torch.device, repeats: int) -> tuple[float, Tensor]:
    """The best of ``repeats`` timed calls after one warm-up, the device synchronized."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=11008)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--density", default="0.2,0.5,0.9", help="TIES densities: k = density * entries")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(args.rows, args.cols, generator=g, device=device).mul_(0.02).bfloat16()
    expert = (base.float() + torch.randn(args.rows, args.cols, generator=g, device=device).mul_(0.002)).bfloat16()
    bits = (expert.float() - base.float()).abs().view(torch.int32).reshape(-1)  # as fused._cut forms them
    n = bits.numel()
    print(f"k-th largest |delta| of one {args.rows}x{args.cols} bf16 task vector ({n:,} entries) on {device}, "
          f"best of {args.repeats}")
    print(f"{'density':>8}{'kthvalue ms':>13}{'topk ms':>10}{'kthvalue/topk':>15}  same value")
    disagree = 0
    for density in (float(d) for d in args.density.split(",")):
        k = min(n - 1, max(1, round(density * n)))
        slow, a = best_seconds(lambda: kth_by_kthvalue(bits, k), device, args.repeats)
        fast, b = best_seconds(lambda: kth_by_topk(bits, k), device, args.repeats)
        same = bool(a == b)
        disagree += not same
        print(f"{density:>8.2f}{slow * 1e3:>13.2f}{fast * 1e3:>10.2f}{slow / fast:>15.2f}  {same}")
        summary = os.environ.get("GPU_CHECK_SUMMARY")  # a line of the GPU check's table
        if summary:
            with open(summary, "a") as f:
                f.write(f"select\tdensity {density:.2f}\tkthvalue {slow * 1e3:.2f} ms, topk {fast * 1e3:.2f} ms, "
                        f"ratio {slow / fast:.2f}, same value {same}\n")
    if disagree:
        raise SystemExit(f"device_select: the two selections disagree at {disagree} densities")


if __name__ == "__main__":
    main()
