"""Merge scaling: seconds per operator for 3 sources (base + 2 experts) from 20 M to 1 B parameters,
as a fraction of copy bandwidth measured in the same run, against mergekit's in-memory merge
and, with ``--baseline REV``, against the operators of an older git revision.

Sources are random float32 tensors (``--dtype bfloat16``: rounded to bf16) with a Llama model's names and shapes (built on the fly in
memory, no disk): θ_b ~ N(0, 0.02²), θ_i = θ_b + 0.002·(shared + own noise). Every timing runs
the operator over every tensor into a preallocated output (what a worker's ``Materializer.apply``
does, minus its one reduction per tensor), random operators with the worker's per-tensor
generator. The ratio columns are measured in the same process at the same thread count:

- ``copy``: ``dst.copy_(src)`` of one model's float32 tensor, source bytes read per second,
  measured right before and right after each operator (the higher: the stricter bar); with
  ``--rounds R`` all of it R times, and ``frac`` is the median (its range in brackets).
- ``frac``: (source bytes the operator reads / its seconds) / copy; 1.0 is the copy limit.
- ``old``: the same operator from ``--baseline`` (a git revision, loaded from ``git show``).
- ``mergekit``: ``merge_state_dicts`` of the same merge (sizes up to ``--mergekit-max``).

Worker memory: resident set of the process with the sources and one output model, and its
peak; the table in docs/performance.md extrapolates both to 7 B and 70 B.

    nice -n 10 python benchmarks/merge_scaling.py --sizes 20m,100m --threads 1,2 --baseline HEAD~1
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from evomerge.workers.mergekit import SHARED_METHODS  # noqa: E402
from evomerge.workers.layout import tensor_seed  # noqa: E402
from evomerge.workers.registry import OPERATORS  # noqa: E402
from evomerge.workers.registry import Operator  # noqa: E402
from merge_throughput import PER_EXPERT, SHARED, make_recipe, mergekit_call  # noqa: E402

# hidden, layers, MLP, heads; vocab 32000, tied embeddings
SIZES = {"20m": (384, 6, 1024, 6), "100m": (768, 12, 2048, 12), "265m": (1024, 18, 2816, 16),
         "500m": (1536, 16, 4608, 16),
         "1b": (2048, 18, 5632, 16)}
NAMES = ("base", "expert_a", "expert_b")


def llama_shapes(size: str) -> dict[str, tuple[int, ...]]:
    hidden, layers, mlp, heads = SIZES[size]
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=mlp,
                      num_attention_heads=heads, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return {k: tuple(p.shape) for k, p in model.named_parameters()}


def build_sources(size: str, dtype: torch.dtype = torch.float32) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    sources: dict[str, dict[str, torch.Tensor]] = {n: {} for n in NAMES}
    for key, shape in llama_shapes(size).items():
        base = torch.randn(shape, generator=g).mul_(0.02)
        shared = torch.randn(shape, generator=g).mul_(0.002)
        for name in NAMES[1:]:
            sources[name][key] = torch.randn(shape, generator=g).mul_(0.002).add_(shared).add_(base).to(dtype)
        sources["base"][key] = base.to(dtype)
    return sources


def old_operators(rev: str) -> dict[str, Operator]:
    """The operators registered by ``workers/operators.py`` at git revision ``rev``, loaded into
    a registry of their own (module names prefixed, so today's registry is untouched)."""
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-old-"))
    show = lambda path: subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"],  # noqa: E731
                                       check=True, capture_output=True, text=True).stdout
    (tmp / "_old_registry.py").write_text(show("workers/registry.py"))
    try:
        (tmp / "_old_sparsify.py").write_text(show("workers/kernels/sparsify.py"))
    except subprocess.CalledProcessError:  # a revision before the numerics moved under workers/kernels/
        (tmp / "_old_sparsify.py").write_text(show("workers/sparsify.py"))
    ops = (show("workers/operators.py")
           .replace("from evomerge.workers import sparsify\n", "import _old_sparsify as sparsify\n")
           .replace("from evomerge.workers.kernels import sparsify\n", "import _old_sparsify as sparsify\n")
           .replace("from evomerge.workers.registry import", "from _old_registry import"))
    (tmp / "_old_operators.py").write_text(ops)
    sys.path.insert(0, str(tmp))
    importlib.import_module("_old_operators")
    return importlib.import_module("_old_registry").OPERATORS


def params_for(op: Operator, n: int) -> dict[str, Any]:
    return {p.name: (PER_EXPERT[p.name][:n] if p.per_expert else SHARED[p.name]) for p in op.params}


def run_op(op: Operator, sources: Mapping[str, Mapping[str, torch.Tensor]], out: Mapping[str, torch.Tensor]) -> None:
    experts = NAMES[1:2] if op.name == "slerp" else NAMES[1:]
    kwargs = params_for(op, len(experts))
    for key, target in out.items():
        generator = torch.Generator().manual_seed(tensor_seed(1, key)) if op.random else None
        op.fn(sources["base"][key], [sources[m][key] for m in experts], normalize=SHARED_METHODS.get(op.name, False),
              generator=generator, out=target, **kwargs)


def timed(fn: Callable[[], Any], repeats: int, slow_s: float = 20.0) -> float:
    """Best of ``repeats`` after a warm-up; the warm-up alone when it is slower than ``slow_s``."""
    start = time.perf_counter()
    fn()
    best = time.perf_counter() - start
    for _ in range(repeats if best < slow_s else 0):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bytes_read(op: str, numel: int, itemsize: int = 4) -> int:
    reads = {"swap": 1, "linear": 2, "slerp": 2}.get(op, 3)
    return reads * numel * itemsize


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def mergekit_seconds(op: str, sources: Mapping[str, Mapping[str, torch.Tensor]], repeats: int) -> float | None:
    if op not in SHARED_METHODS:
        return None
    from mergekit.merge_methods import merge_state_dicts

    ids, base, params, _ = mergekit_call(make_recipe(op), {n: Path("/models") / n for n in NAMES})

    def merge() -> None:
        torch.manual_seed(0)
        with torch.no_grad():
            merge_state_dicts({i: sources[i] for i in ids}, op, base=base, parameters=params)
    return timed(merge, repeats)


def copy_bandwidth(numel: int) -> float:
    """Bytes read per second by dst.copy_(src) of ``numel`` float32 entries (at most 2^26: 256 MB,
    far past any cache, so two more model-sized tensors need not fit at 1 B), at the current threads."""
    numel = min(numel, 1 << 26)
    src, dst = torch.randn(numel), torch.empty(numel)
    return numel * 4 / timed(lambda: dst.copy_(src), 5)


def op_fraction(op: str, sources: Mapping[str, Mapping[str, torch.Tensor]], out: Mapping[str, torch.Tensor],
                numel: int, repeats: int, rounds: int) -> tuple[float, float, list[float]]:
    """(median seconds, median copy bandwidth, frac of each round) of one operator. Each round
    measures copy right before and right after the operator and takes the higher (the stricter
    bar): a shared machine's bandwidth drifts by 10-30 % over minutes, which one copy figure per
    thread count would charge to whichever operators ran in a slow stretch."""
    seconds, copies, frac = [], [], []
    for _ in range(rounds):
        copy = copy_bandwidth(numel)
        seconds.append(timed(lambda: run_op(OPERATORS[op], sources, out), repeats))
        copies.append(max(copy, copy_bandwidth(numel)))
        frac.append(bytes_read(op, numel, out[next(iter(out))].element_size()) / seconds[-1] / copies[-1])
    return statistics.median(seconds), statistics.median(copies), frac


def bench_size(size: str, threads: list[int], args: argparse.Namespace, old: Mapping[str, Operator],
               with_mergekit: bool) -> None:
    """One size: every operator at every thread count, with the old code and mergekit."""
    rss0 = rss_gb()
    sources = build_sources(size, getattr(torch, args.dtype))
    out = {k: torch.empty_like(v) for k, v in sources["base"].items()}
    numel = sum(v.numel() for v in out.values())
    held = rss_gb() - rss0
    ops = [o for o in args.ops.split(",") if o] or list(OPERATORS)
    if size in ("500m", "1b"):
        ops = [o for o in ops if o in args.big_ops.split(",")]
    itemsize = out[next(iter(out))].element_size()
    print(f"\n{size}, {args.dtype}: {numel / 1e6:.0f} M parameters/model, 3 sources + output {held:.2f} GB resident "
          f"({4 * numel * itemsize / 1e9:.2f} GB of tensors)", flush=True)
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        print(f"  {n_threads} thread(s)")
        print(f"  {'operator':17s} {'s':>7s} {'ns/param':>8s} {'copy GB/s':>9s} {'frac':>5s} | {'old s':>7s}"
              f" {'new/old':>7s} | {'mergekit s':>10s} {'x mk':>6s}")
        for op in ops:
            seconds, copy, frac = op_fraction(op, sources, out, numel, args.repeats, args.rounds)
            spread = f" ({min(frac):.2f}-{max(frac):.2f})" if len(frac) > 1 else ""
            line = (f"  {op:17s} {seconds:7.3f} {seconds / numel * 1e9:8.2f} {copy / 1e9:9.2f} "
                    f"{statistics.median(frac):5.2f}{spread}")
            if op in old and op in args.baseline_ops.split(","):
                old_s = timed(lambda: run_op(old[op], sources, out), 0 if size in ("500m", "1b") else 1)
                line += f" | {old_s:7.3f} {old_s / seconds:6.1f}x"
            else:
                line += f" | {'-':>7s} {'-':>7s}"
            mk = mergekit_seconds(op, sources, 0) if with_mergekit and n_threads == threads[-1] else None
            line += f" | {mk:10.3f} {mk / seconds:5.1f}x" if mk else f" | {'-':>10s} {'-':>6s}"
            print(line, flush=True)
    print(f"  peak resident so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20m,100m", help=f"comma-separated of {', '.join(SIZES)}")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--ops", default="", help="comma-separated operators (default: all)")
    parser.add_argument("--big-ops", default="task_arithmetic,dare_ties,ties",
                        help="operators for sizes of 500m and above")
    parser.add_argument("--baseline", default="", help="git revision whose operators are timed too")
    parser.add_argument("--baseline-ops", default="ties,dare_linear,dare_ties,breadcrumbs,breadcrumbs_ties,della,"
                        "della_linear,consensus", help="operators timed at --baseline (the others did not change)")
    parser.add_argument("--mergekit-max", default="100m", help="largest size compared with mergekit ('' for none)")
    parser.add_argument("--repeats", type=int, default=2, help="timings per round (the best counts)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per operator: frac is their median")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the sources' and output's dtype (copy is measured in float32 bytes either way)")
    parser.add_argument("--simdlen", type=int, default=0,
                        help="inductor's vector width in bits (256: the AVX2 code on any x86 CPU; with "
                             "EVOMERGE_NATIVE_ARCH=x86-64-v3 the native kernels' too); 0: the machine's")
    args = parser.parse_args()
    if args.simdlen:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.simdlen = args.simdlen
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in SIZES] + [o for o in args.ops.split(",") + args.big_ops.split(",")
                                                   if o and o not in OPERATORS]
    if bad:
        parser.error(f"unknown size or operator {bad[0]!r}")
    threads = [int(t) for t in args.threads.split(",")]
    old = old_operators(args.baseline) if args.baseline else {}
    mk_sizes = list(SIZES)[:list(SIZES).index(args.mergekit_max) + 1] if args.mergekit_max else []
    print(f"load average {os.getloadavg()[0]:.2f}; baseline {args.baseline or '-'}", flush=True)
    for size in sizes:
        bench_size(size, threads, args, old, size in mk_sizes)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; frac = fraction of copy bandwidth (1.0 = limit); "
          "new/old and x mk = speed ratios at the same thread count")


if __name__ == "__main__":
    main()
