"""Inner products of task vectors (workers/kernels/gram.py, gram.cpp): the native pass and the whole-tensor
torch ops of the device graph both give the float64 Gram of the float32 task vectors to ~1e-16,
whatever the count, the dtype, the size or the threads, and Model Stock / SLERP built on them keep
their defining properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.workers.kernels import gram, native
from evomerge.workers.registry import OPERATORS


def _exact(base: torch.Tensor | None, tensors: list[torch.Tensor]) -> tuple[list[list[float]], list[list[float]]]:
    """The Gram by correctly rounded sums (math.fsum) of the exact float64 products of the
    float32 task vectors (float64 for float64 tensors), and Σ|products| (the scale of a sum's rounding error)."""
    work = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    deltas = [(t.to(work) - base.to(work)) if base is not None else t.to(work) for t in tensors]
    wide = [d.double() for d in deltas]
    exact = [[math.fsum((a * b).tolist()) for b in wide] for a in wide]
    scale = [[float((a * b).abs().sum()) for b in wide] for a in wide]
    return exact, scale


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40_000), count=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), with_base=st.booleans(),
       spread=st.sampled_from([1e-3, 1.0, 1e4]))
def test_both_paths_give_the_exact_gram(seed: int, n: int, count: int, dtype: torch.dtype, with_base: bool,
                                        spread: float) -> None:
    """Counts 1-4 (registers) and 5-6 (the general loop), sizes with and without vector tails and
    across several blocks: each entry within 1e-13 of Σ|products| of the correctly rounded sum."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype) if with_base else None
    tensors = [(torch.randn(n, generator=g) * spread).to(dtype) for _ in range(count)]
    exact, scale = _exact(base, tensors)
    native = gram.gram(base, tensors)
    assert native is not None
    for path, entries in (("native", native), ("torch", gram.whole_gram(base, tensors))):
        got = [[float(x) for x in row] for row in entries]
        for i in range(count):
            for k in range(count):
                assert got[i][k] == got[k][i]
                assert abs(got[i][k] - exact[i][k]) <= 1e-13 * scale[i][k], (path, i, k)


def test_the_gram_does_not_depend_on_the_thread_count(threads: int) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3_000_017, generator=g)
    experts = [base + torch.randn(3_000_017, generator=g) for _ in range(3)]
    torch.set_num_threads(1)
    one = gram.gram(base, experts)
    torch.set_num_threads(threads + 1)
    again = gram.gram(base, experts)
    assert one is not None and again is not None
    assert [[float(x) for x in row] for row in again] == [[float(x) for x in row] for row in one]  # bit for bit


def test_inputs_the_native_pass_does_not_take_go_the_torch_way() -> None:
    """float16, float64 and strided views are not the kernel's (it answers None): the torch ops
    answer them, to the same exact Gram."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(5000, generator=g)
    cases = [(base.half(), [torch.randn(5000, generator=g).half()]),
             (base.double(), [torch.randn(5000, generator=g).double()]),
             (base[::2], [torch.randn(5000, generator=g)[::2]])]
    for b, tensors in cases:
        assert not native.takes([*tensors, b]) and gram.gram(b, tensors) is None
        exact, scale = _exact(b, tensors)
        assert abs(float(gram.whole_gram(b, tensors)[0][0]) - exact[0][0]) <= 1e-12 * scale[0][0]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), experts=st.integers(2, 5), n=st.integers(64, 20_000))
def test_model_stock_stays_between_the_base_and_the_experts_mean(seed: int, experts: int, n: int) -> None:
    """θ = t·mean(θ_i) + (1 − t)·θ_b with t in [0, 1]: each entry lies between the base's and the
    mean's (to float32 rounding), and identical experts give their mean (cos θ = 1, t = 1)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    shared = torch.randn(n, generator=g)
    tensors = [base + shared + torch.randn(n, generator=g) for _ in range(experts)]
    merged = OPERATORS["model_stock"].fn(base, tensors)
    mean = torch.stack(tensors).mean(0)
    low, high = torch.minimum(base, mean), torch.maximum(base, mean)
    slack = 1e-5 * (base.abs() + mean.abs() + 1)
    assert bool(((merged >= low - slack) & (merged <= high + slack)).all())
    same = OPERATORS["model_stock"].fn(base, [tensors[0]] * experts)
    torch.testing.assert_close(same, tensors[0], rtol=1e-6, atol=1e-6)


def test_slerp_keeps_the_norm_of_orthogonal_unit_tensors() -> None:
    """Two orthogonal tensors of equal norm: every point of the arc has that norm."""
    a = torch.zeros(4096)
    b = torch.zeros(4096)
    a[:2048], b[2048:] = 1.0, 1.0
    for t in (0.1, 0.5, 0.9):
        merged = OPERATORS["slerp"].fn(a, [b], t=t)
        assert float(merged.double().norm()) == pytest.approx(float(a.double().norm()), rel=1e-6)
