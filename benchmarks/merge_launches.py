"""Kernel launches and host syncs per tensor and per candidate: the figure that decides a merge's
cost on a GPU, measured without one.

On an H200 a 7 B merge is bound by launches, not bytes (docs/performance.md): a dozen ops per
2^18-entry chunk is ~2.6 M launches per DARE-TIES candidate. This benchmark merges one tensor of
each shape class of a 7 B and a 70 B Llama per operator under ``torch.profiler`` and counts:

- launches: the leaf ops that run a kernel (a view or an allocation does not), every kernel a
  compiled region runs (inductor's C++ kernels here, its Triton kernels on a GPU: one each), and
  every copy of host-built values to the device; work the code labels as host-side (drawing a
  DARE key from the host generator, building a kernel's scalars) is not a launch;
- syncs: the ops that make the host wait for the device (``item``, ``nonzero``, a labelled read
  back...);
- allocated: bytes allocated during the merge beyond the output (an upper bound of the peak).

It runs the path a GPU worker takes, on the CPU: the native C++ kernels off (CPU-only, a GPU never
has them), and at 8 torch threads so a chunk of the eager paths holds 2^21 entries: every tensor
counted here (each shape at 1/64 of 7 B's and 1/512 of 70 B's size, at least fused.FUSE_MIN
entries: a GPU fuses every size, the CPU only from FUSE_MIN) is one chunk, as a GPU's whole-tensor
chunk. Launch counts do not depend on a tensor's size once it is one chunk, so per candidate is
the per-shape figure times the model's tensors of that shape. ``--eager`` counts the eager pass
(no compiler), ``--cpu-chunks`` at one thread with the CPU's own chunks (2^18 entries) and full
size: what a GPU tensor took before whole-tensor chunks (issue 19's 17,736 for DARE-TIES).

    python benchmarks/merge_launches.py [--models 7b,70b] [--ops dare_ties,ties] [--eager] [--cpu-chunks]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

os.environ["EVOMERGE_NATIVE"] = "0"  # the GPU path: no CPU-only kernels
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from evomerge.workers.kernels import fused  # noqa: E402
from evomerge.workers.registry import OPERATORS  # noqa: E402

# (hidden, MLP, layers, vocab, kv heads / heads): Llama-2 7 B and Llama-3 70 B
MODELS = {"7b": (4096, 11008, 32, 32000, 1.0, 64), "70b": (8192, 28672, 80, 128256, 0.125, 512)}
NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_unsafe_view",
             "aten::reshape", "aten::_reshape_alias", "aten::slice", "aten::select", "aten::as_strided",
             "aten::detach", "aten::detach_", "aten::alias", "aten::unsqueeze", "aten::squeeze", "aten::expand",
             "aten::t", "aten::transpose", "aten::as_strided_", "aten::squeeze_", "aten::unsqueeze_", "aten::permute", "aten::unbind", "aten::split", "aten::chunk",
             "aten::flatten", "aten::view_as", "aten::result_type", "aten::resize_", "aten::set_",
             "aten::to", "aten::_to_copy", "aten::contiguous", "aten::lift_fresh_copy", "detach", "detach_"}
HOST_TO_DEVICE = {"aten::lift_fresh"}  # torch.tensor(list): a copy to a GPU
SYNCS = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::tolist", "aten::is_nonzero",
         "aten::equal", "aten::masked_select", "aten::unique", "aten::_unique2"}
EXEMPT = {"pcb", "della", "della_linear"}  # rank-based: a sort per tensor by design (the bar excepts them)
BAR = 8


@dataclass(frozen=True)
class Count:
    """One merge of one tensor."""

    launches: int
    syncs: int
    allocated: int  # bytes


def shapes(model: str) -> list[tuple[str, tuple[int, int], int]]:
    """(name, shape, tensors of that shape in the model) for a Llama of ``MODELS[model]``."""
    hidden, mlp, layers, vocab, kv, _ = MODELS[model]
    return [("embed/head", (vocab, hidden), 2), ("q/o proj", (hidden, hidden), 2 * layers),
            ("k/v proj", (int(hidden * kv), hidden), 2 * layers), ("gate/up", (mlp, hidden), 2 * layers),
            ("down", (hidden, mlp), layers), ("norm", (hidden,), 2 * layers + 1)]


def _launches(event: object) -> tuple[int, int]:
    """(launches, syncs) of a profiler event and what it calls. The merge code labels its host-side
    work (``evomerge.host``: a generator's draw, building a kernel's scalars: CPU ops on a GPU
    worker too), its copies to the device (``evomerge.h2d:N``: N launches) and its read
    backs (``evomerge.sync``)."""
    name, children = event.name, event.cpu_children  # type: ignore[attr-defined]
    if name == "evomerge.host":
        return 0, 0
    if name.startswith("evomerge.h2d:"):
        return int(name.split(":")[1]), 0
    if name in SYNCS or name == "evomerge.sync":
        return 0, 1
    if "cpp_fused" in name or "triton_" in name:
        return 1, 0
    if not children:
        return (1 if name in HOST_TO_DEVICE or (name.startswith("aten::") and name not in NO_KERNEL) else 0), 0
    total = [_launches(c) for c in children]
    return sum(t[0] for t in total), sum(t[1] for t in total)


def _params(name: str, experts: int) -> dict[str, object]:
    op, kw = OPERATORS[name], {}
    for p in op.params:
        value = {"density": 0.4, "weight": 0.7, "gamma": 0.02, "epsilon": 0.1, "tall": 0.4, "select": 0.7,
                 "t": 0.3, "ratio": 0.3}.get(p.name, p.default)
        kw[p.name] = (value,) * experts if p.per_expert else value
    return kw


def count(name: str, numel: int, dtype: torch.dtype) -> Count:
    """Launches, syncs and allocated bytes of one merge of ``numel`` entries (after a warm-up that
    compiles the kernel)."""
    op = OPERATORS[name]
    experts = 1 if op.experts[1] == 1 else 2
    g = torch.Generator().manual_seed(0)
    base = torch.randn(numel, generator=g).to(dtype)
    sources = [(base.float() + 0.02 * torch.randn(numel, generator=g)).to(dtype) for _ in range(experts)]
    out, kw = torch.empty_like(base), _params(name, experts)

    def merge() -> None:
        op.fn(base, sources, normalize=False, generator=torch.Generator().manual_seed(1), out=out, **kw)

    merge()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("merge"):
            merge()
    events = prof.events()
    root = next(e for e in events if e.name == "merge")
    launches = syncs = 0
    for event in root.cpu_children:
        got = _launches(event)
        launches, syncs = launches + got[0], syncs + got[1]
    allocated = sum(max(0, e.cpu_memory_usage) for e in events if e.cpu_memory_usage and not e.cpu_children)
    return Count(launches, syncs, allocated)


def report(model: str, ops: Iterable[str], dtype: torch.dtype, cpu_chunks: bool) -> bool:
    """Print one model's table; whether every operator but the exempt meets the bar."""
    scale = MODELS[model][5]
    rows = shapes(model)
    print(f"\n{model} Llama, {dtype}, per tensor ({'full size, CPU chunks' if cpu_chunks else f'1/{scale} size'}; "
          f"{sum(r[2] for r in rows)} tensors per candidate)")
    print(f"  {'operator':17s} {'launches/tensor':>15s} {'syncs/tensor':>12s} {'alloc MB/tensor':>15s} "
          f"{'launches/candidate':>18s} {'syncs/candidate':>15s}  bar")
    ok = True
    for name in ops:
        per_shape = []
        for _, shape, tensors in rows:
            numel = int(torch.tensor(shape).prod())
            size = numel if cpu_chunks else max(fused.FUSE_MIN, numel // scale)
            per_shape.append((count(name, size, dtype), tensors))
        worst = max(c.launches for c, _ in per_shape)
        syncs = max(c.syncs for c, _ in per_shape)
        alloc = max(c.allocated for c, _ in per_shape) / 2**20
        total = sum(c.launches * t for c, t in per_shape)
        total_syncs = sum(c.syncs * t for c, t in per_shape)
        meets = worst <= BAR and syncs == 0
        ok = ok and (meets or name in EXEMPT)
        mark = "ok" if meets else ("exempt" if name in EXEMPT else "MISS")
        print(f"  {name:17s} {worst:15d} {syncs:12d} {alloc:15.1f} {total:18,d} {total_syncs:15,d}  {mark}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="7b,70b")
    parser.add_argument("--ops", default=",".join(sorted(OPERATORS)))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--eager", action="store_true", help="the eager pass (no compiled kernels)")
    parser.add_argument("--cpu-chunks", action="store_true",
                        help="one thread, full-size tensors, the CPU's 2^18-entry chunks (what a GPU took before)")
    args = parser.parse_args()
    if args.eager:
        os.environ["EVOMERGE_FUSED"] = "0"
    torch._inductor.config.cpp.enable_kernel_profile = True  # each C++ kernel call shows in the profile
    torch.set_num_threads(1 if args.cpu_chunks else 8)
    ops = [o for o in args.ops.split(",") if o]
    ok = all([report(m, ops, getattr(torch, args.dtype), args.cpu_chunks) for m in args.models.split(",")])
    print(f"\nbar: at most {BAR} launches and 0 syncs per tensor for every operator but {', '.join(sorted(EXEMPT))}: "
          f"{'met' if ok else 'not met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
