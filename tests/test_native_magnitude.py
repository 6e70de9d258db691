"""The native magnitude kernels (workers/kernels/band_scan.cpp, band_merge.cpp) against the torch paths
(fused.device_cuts, fused.trimmed_merge's uncompiled merge): the same cuts and the same merged bits, whatever the sample, the dtype, the ties or the threads,
and a fallback that still gives them where a sample misleads. Building and turning off the
kernels: tests/test_native_build.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.workers.kernels import band_cuts, fused, magnitude_merge, selection, sparsify
from evomerge.workers.registry import OPERATORS

ROOT = Path(__file__).resolve().parent.parent


def _tensors(seed: int, n: int, experts: int, kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    if kind == "ties":  # integer-valued deltas: many entries equal at every cut
        out = [base + torch.randint(-6, 7, (n,), generator=g).float() * 1e-3 for _ in range(experts)]
    elif kind == "zeros":  # exact zeros in the task vectors and in the base
        out = [base + torch.randn(n, generator=g) * 2e-3 for _ in range(experts)]
        out[0][::5] = base[::5]
        base[::13] = 0.0
    else:
        out = [base + torch.randn(n, generator=g) * 2e-3 for _ in range(experts)]
    return base.to(dtype), [e.to(dtype) for e in out]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), n=st.integers(64, 40_000), kind=st.sampled_from(["plain", "ties", "zeros"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), with_base=st.booleans(),
       fractions=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4))
def test_native_cuts_equal_the_device_cuts(seed: int, n: int, kind: str, dtype: torch.dtype, with_base: bool,
                                          fractions: list[float]) -> None:
    base, experts = _tensors(seed, n, 2, kind, dtype)
    wants = [(i % 2, min(n - 1, max(1, int(f * n)))) for i, f in enumerate(fractions)]
    b = base if with_base else None
    assert _rows(experts, b, wants) == fused.device_cuts(experts, b, wants).tolist()


def _rows(experts: list[torch.Tensor], base: torch.Tensor | None, wants: list[tuple[int, int]]) -> list[list[int]]:
    """The native cuts as device_cuts' rows; every one found (a sample that misleads twice: practically never)."""
    cuts = selection.native_cuts(experts, base, wants)
    assert cuts is not None and all(c is not None for c in cuts)
    return [[c.value, selection.NO_SPLIT if c.until is None else c.until] for c in cuts if c is not None]


def test_more_cuts_than_one_native_call_takes_are_split_into_calls() -> None:
    # Breadcrumbs over 17 experts asks for 34 cuts; one native call takes 32
    base, experts = _tensors(5, 8192, 17, "plain", torch.float32)
    wants = [(i, k) for i in range(17) for k in (600, 200)]
    assert len(wants) > selection.MAX_SLOTS
    native = _rows(experts, base, wants)
    assert len(native) == len(wants) and native == fused.device_cuts(experts, base, wants).tolist()
    k = len(experts)
    merged = OPERATORS["breadcrumbs"].fn(base, experts, density=[0.9] * k, gamma=[0.05] * k, weight=[1 / k] * k)
    assert merged.shape == base.shape and bool(torch.isfinite(merged).all())  # it raised before


def test_cuts_too_large_for_one_graph_are_selected_in_groups() -> None:
    """Cuts whose rows would outgrow the scratch budget (a 70 B embedding's) are selected a group
    at a time: the same rows as one graph and as the native selection, with a partial last group,
    and the same picks of them for the merge kernel's keys."""
    n = 30_011
    base, experts = _tensors(7, n, 3, "ties", torch.float32)
    wants = [(0, 12_000), (0, 400), (1, 6_000), (2, 20_000), (2, 90)]
    whole = fused.device_cuts(experts, base, wants)
    assert whole.tolist() == _rows(experts, base, wants)
    for per_graph in (1, 2, 3):
        scratch = per_graph * band_cuts.CUT_ROW_BYTES * n
        assert band_cuts.group_size(len(wants), n, scratch) == per_graph
        assert torch.equal(fused.device_cuts(experts, base, wants, scratch), whole), per_graph
    consts, picks = [*band_cuts.CONSTS, 12345], [9, 0, 10, 3, 11, 4, 1]
    assert torch.equal(fused._selected(experts, base, wants, consts, picks, band_cuts.CUT_ROW_BYTES * n),
                       fused._selected(experts, base, wants, consts, picks))


def _misleading(n: int = 64 * 1024) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A tensor whose large magnitudes all sit between the sample's blocks: every block sees only
    small ones, so the sampled bracket lies far below the true cut."""
    delta = torch.full((n,), 1e-3)
    block = selection.sample_size(n) // 64
    starts = [(b * (n - block)) // 63 for b in range(64)]
    sampled = torch.zeros(n, dtype=torch.bool)
    for s in starts:
        sampled[s:s + block] = True
    gaps = (~sampled).nonzero().flatten()
    delta[gaps[::3]] = torch.linspace(1.0, 2.0, len(gaps[::3]))
    return torch.zeros(n), delta, len(gaps[::3]) // 2


def test_a_misleading_sample_misses_and_the_fallback_is_exact(threads: int) -> None:
    base, delta, k = _misleading()
    lib = selection.kernel()
    assert lib is not None
    assert selection._native_cuts(lib, [delta], base, [(0, k)], selection.WIDTHS[0]) == [None]  # missed
    value, until = fused.trim_cuts([delta], base, [(0, k)]).tolist()[0]  # a miss is selected by device_cuts
    bits, index = delta.abs().view(torch.int32), torch.arange(delta.numel())
    assert int(((bits > value) | ((bits == value) & (index < until))).sum()) == k
    out = torch.empty_like(base)
    trims = sparsify.ties_trims([k / delta.numel()], delta.numel())
    assert not magnitude_merge.merge(base, [delta], trims, [1.0], coeff=1.0, scale=1.0, consensus=True,
                                     normalize=False, out=out)  # the one pass declines ...
    merged = OPERATORS["ties"].fn(base, [base + delta], density=(k / delta.numel(),), weight=(1.0,))
    assert int((merged != base).sum()) == k  # ... and the operator still keeps exactly k


def _two_step(base: torch.Tensor, experts: list[torch.Tensor], weight: list[float], trims: list[sparsify.Trim],
              consensus: bool, normalize: bool) -> torch.Tensor:
    """The torch path: fused.device_cuts, then fused._merge (uncompiled: these tensors are under FUSE_MIN)."""
    out = torch.full_like(base, float("nan"))
    coeff = 0.8 / (sum(weight) if normalize and not consensus else 1.0)
    fused.trimmed_merge(base, experts, weight, trims, scale=0.8, coeff=coeff, consensus=consensus,
                        normalize=normalize, out=out, native_path=False)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("kind", ["plain", "ties", "zeros"])
def test_one_pass_merge_equals_the_two_step_merge_bit_for_bit(threads: int, method: str, kind: str,
                                                              dtype: torch.dtype) -> None:
    """Odd sizes (a scalar tail), 1-3 experts with a negative weight, a keep-nothing and a
    keep-all trim, the election normalized or not, the sum; bfloat16 sources widened and the
    result rounded once, as the two-step path does."""
    for n, count in ((100_003, 3), (40_000, 2), (5_001, 1)):
        base, experts = _tensors(n + count, n, count, kind, dtype)
        density, gamma, weight = [0.3, 0.0, 1.0][:count], [0.02, 0.1, 0.0][:count], [0.9, -0.4, 1.1][:count]
        if count == 1:
            density = [0.45]
        trims = (sparsify.ties_trims(density, n) if method == "ties"
                 else sparsify.breadcrumbs_trims(density, gamma, n))
        consensus = method != "breadcrumbs"
        for normalize in (False, True):
            out = torch.full_like(base, float("nan"))
            coeff = 0.8 / (sum(weight) if normalize and not consensus else 1.0)
            assert magnitude_merge.merge(base, experts, trims, weight, coeff=coeff, scale=0.8, consensus=consensus,
                                         normalize=normalize, out=out)
            expected = _two_step(base, experts, weight, trims, consensus, normalize)
            assert torch.equal(out, expected) and not bool(out.isnan().any()), (n, count, normalize)


def test_the_one_pass_takes_only_what_it_can() -> None:
    big = torch.zeros(1 << 12)
    assert magnitude_merge.eligible(big, [big, big], big)
    assert magnitude_merge.eligible(big.bfloat16(), [big.bfloat16()], big.bfloat16())
    assert not magnitude_merge.eligible(big.half(), [big.half()], big.half())  # float16: the two-step path
    assert not magnitude_merge.eligible(big.bfloat16(), [big], big)  # one dtype
    assert not magnitude_merge.eligible(big[::2], [big[::2]], big[::2])  # not contiguous
    assert not magnitude_merge.eligible(big[:32], [big[:32]], big[:32])  # under NATIVE_MIN
    assert not magnitude_merge.eligible(big, [big] * 17, big)  # more experts than the kernel takes


def test_concurrent_callers_share_the_worker_threads(threads: int) -> None:
    """Python threads calling the kernels at once (ctypes releases the GIL) take turns on the
    library's worker threads and each gets its own exact result."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [_tensors(seed, 30_000 + seed, 2, "plain", torch.float32) for seed in range(6)]

    def merged(case: tuple[torch.Tensor, list[torch.Tensor]]) -> torch.Tensor:
        base, experts = case
        return OPERATORS["ties"].fn(base, experts, density=(0.3, 0.6), weight=(1.0, 0.5))

    expected = [merged(case) for case in cases]  # one caller at a time
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(merged, cases * 3))
    for want, got in zip(expected * 3, results):
        assert torch.equal(want.view(torch.int32), got.view(torch.int32))


def test_a_forked_child_starts_its_own_workers() -> None:
    """The worker threads do not survive fork(): a child that selects and merges with two threads
    starts its own rather than wait on its parent's. (Only the native kernels run in the child:
    torch's own parallel ops may hang after a fork, native or not.)"""
    script = (
        "import hashlib, os, sys, torch\n"
        "from evomerge.workers.kernels import magnitude_merge, selection, sparsify\n"
        "torch.set_num_threads(2)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "base = torch.randn(200_003, generator=g)\n"
        "experts = [base + 0.1 * torch.randn(200_003, generator=g) for _ in range(2)]\n"
        "def run():\n"
        "    out = torch.empty_like(base)\n"
        "    assert magnitude_merge.merge(base, experts, sparsify.ties_trims([0.3, 0.6], 200_003), [1.0, 0.5],\n"
        "                                 coeff=1.0, scale=1.0, consensus=True, normalize=False, out=out)\n"
        "    cuts = selection.native_cuts(experts, base, [(0, 60_000), (1, 120_000)])\n"
        "    return cuts, hashlib.sha256(out.numpy().tobytes()).hexdigest()\n"
        "parent = run()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if run() == parent else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
