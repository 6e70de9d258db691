"""The native linear combination (workers/kernels/combine.cpp, behind streaming.combine): the same bits
as the torch path entry by entry, whatever the term count, dtype, size (vector tails, streamed
stores), alignment, aliasing or threads."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.workers.kernels import native, streaming


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _both(terms: list[tuple[torch.Tensor, float]], out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    mine = streaming.combine(terms, None if out is None else out.clone())
    theirs = streaming.combine(terms, None if out is None else out.clone(), native_path=False)
    return mine, theirs


def test_the_kernel_builds_here() -> None:
    assert native.library("combine") is not None


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 300_000), count=st.integers(1, 7),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), exponent=st.integers(-8, 8))
def test_native_combine_equals_the_torch_path_bit_for_bit(seed: int, n: int, count: int, dtype: torch.dtype,
                                                          exponent: int) -> None:
    g = torch.Generator().manual_seed(seed)
    terms = [((torch.randn(n, generator=g) * 2.0 ** exponent).to(dtype), float(torch.randn(1, generator=g)) * 3)
             for _ in range(count)]
    mine, theirs = _both(terms)
    assert torch.equal(_bits(mine), _bits(theirs))


def test_large_tensors_streamed_and_offset_views_match(threads: int) -> None:
    """A tensor past the streaming size, and views that start off a cache line (plain stores)."""
    g = torch.Generator().manual_seed(1)
    whole = [torch.randn(3_000_011, generator=g) for _ in range(3)]
    for start in (0, 1, 5):
        terms = [(w[start:], c) for w, c in zip(whole, (0.25, -1.5, 0.75))]
        mine, theirs = _both(terms)
        assert torch.equal(_bits(mine), _bits(theirs))


def test_special_values() -> None:
    """Infinities, signed zeros, subnormals and the largest finite value give torch's bits; a NaN
    stays a NaN."""
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, 3.4e38, -1e-40] * 5)
    for dtype in (torch.float32, torch.bfloat16):
        mine, theirs = _both([(x.to(dtype), 0.5), (x.flip(0).to(dtype), 2.0)])
        assert torch.equal(mine.isnan(), theirs.isnan())
        finite = ~theirs.isnan()
        assert torch.equal(_bits(mine)[finite], _bits(theirs)[finite])


def test_the_output_may_be_a_term() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(100_003, generator=g), torch.randn(100_003, generator=g)
    expected = streaming.combine([(a, 0.3), (b, 0.7)], None, native_path=False)
    assert torch.equal(_bits(streaming.combine([(a, 0.3), (b, 0.7)], a)), _bits(expected))


def test_what_the_kernel_does_not_take_goes_the_torch_way() -> None:
    """float16, mixed dtypes, a strided view: torch's result."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4096, generator=g)
    for terms in ([(a.half(), 0.5), (a.half(), 0.25)], [(a, 0.5), (a.bfloat16(), 0.25)], [(a[::2], 0.5), (a[1::2], 2.0)]):
        assert not native.takes([t for t, _ in terms])
        mine, theirs = _both(terms)
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("count", [2, 3, 4, 6])
def test_the_sum_does_not_depend_on_the_thread_count(count: int) -> None:
    g = torch.Generator().manual_seed(4)
    terms = [(torch.randn(1_000_003, generator=g), 0.1 * (k + 1)) for k in range(count)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = streaming.combine(terms, None)
        torch.set_num_threads(3)
        assert torch.equal(_bits(streaming.combine(terms, None)), _bits(one))
    finally:
        torch.set_num_threads(before)
