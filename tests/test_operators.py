"""Each merge operator against a direct, element-by-element computation, plus invariants."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.operators import OPERATORS, dare_drop, magnitude_mask, sign_consensus

torch.set_num_threads(1)


def _tensors(seed: int, n: int = 3, shape: tuple[int, ...] = (5, 7)) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) for _ in range(n - 1)]


def _ties_reference(base: torch.Tensor, experts: list[torch.Tensor], weights: list[float],
                    deltas: list[torch.Tensor], normalize: bool) -> torch.Tensor:
    """Direct loop over entries: elect sign of Σ w δ, average the agreeing ones."""
    out = base.clone()
    for idx in itertools.product(*(range(s) for s in base.shape)):
        vals = [float(d[idx]) for d in deltas]
        total = sum(w * v for w, v in zip(weights, vals))
        sign = (total > 0) - (total < 0)
        num = sum(w * v for w, v in zip(weights, vals) if v != 0 and ((v > 0) - (v < 0)) == sign)
        den = sum(w for w, v in zip(weights, vals) if v != 0 and ((v > 0) - (v < 0)) == sign)
        out[idx] += num / den if normalize and abs(den) > 1e-8 else num
    return out


def test_registry_declares_params() -> None:
    for name in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"):
        op = OPERATORS[name]
        assert op.params and all(p.low < p.high and p.low <= p.default <= p.high for p in op.params)
    assert OPERATORS["dare_ties"].random and not OPERATORS["ties"].random


def test_linear_matches_direct() -> None:
    base, experts = _tensors(0)
    out = OPERATORS["linear"].fn(base, experts, weight=[0.2, 0.6], normalize=True)
    torch.testing.assert_close(out, (0.2 * experts[0] + 0.6 * experts[1]) / 0.8)
    raw = OPERATORS["linear"].fn(base, experts, weight=[0.2, 0.6], normalize=False)
    torch.testing.assert_close(raw, 0.2 * experts[0] + 0.6 * experts[1])


def test_task_arithmetic_matches_direct() -> None:
    base, experts = _tensors(1)
    out = OPERATORS["task_arithmetic"].fn(base, experts, weight=[1.0, 0.75])
    torch.testing.assert_close(out, base + 1.0 * (experts[0] - base) + 0.75 * (experts[1] - base))


@pytest.mark.parametrize("normalize", [False, True])
def test_ties_matches_direct(normalize: bool) -> None:
    base, experts = _tensors(2, n=4)
    density, weights = [0.4, 0.6, 1.0], [0.7, 0.5, 1.2]
    out = OPERATORS["ties"].fn(base, experts, density=density, weight=weights, normalize=normalize)
    trimmed = []
    for e, d in zip(experts, density):
        delta = e - base
        k = round(d * delta.numel())
        thresh = delta.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(delta.abs() >= thresh, delta, torch.zeros_like(delta)))
    torch.testing.assert_close(out, _ties_reference(base, experts, weights, trimmed, normalize))


def test_dare_ties_and_linear_match_direct_with_same_masks() -> None:
    base, experts = _tensors(3)
    density, weights = [0.5, 0.3], [0.9, 0.4]
    # Reproduce the masks by drawing from a generator with the same seed in the same order.
    g = torch.Generator().manual_seed(7)
    dropped = []
    for e, d in zip(experts, density):
        keep = torch.rand(base.shape, generator=g) < d
        dropped.append(torch.where(keep, (e - base) / d, torch.zeros_like(base)))
    lin = OPERATORS["dare_linear"].fn(base, experts, density=density, weight=weights,
                                      generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(lin, base + weights[0] * dropped[0] + weights[1] * dropped[1])
    ties = OPERATORS["dare_ties"].fn(base, experts, density=density, weight=weights,
                                     generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ties, _ties_reference(base, experts, weights, dropped, False))


def test_dare_keep_rate_and_expectation() -> None:
    delta = torch.ones(200_000)
    out = dare_drop(delta, 0.3, torch.Generator().manual_seed(0))
    keep = (out != 0).float().mean().item()
    assert abs(keep - 0.3) < 0.005  # binomial sd ≈ 0.001
    assert abs(out.mean().item() - 1.0) < 0.02  # rescale by 1/d keeps the expectation


def test_random_operators_are_reproducible() -> None:
    base, experts = _tensors(4)
    a = OPERATORS["dare_ties"].fn(base, experts, density=[0.5, 0.5], weight=[1, 1], generator=torch.Generator().manual_seed(3))
    b = OPERATORS["dare_ties"].fn(base, experts, density=[0.5, 0.5], weight=[1, 1], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_magnitude_mask_keeps_exactly_the_largest(seed: int, density: float) -> None:
    x = torch.randn(37, generator=torch.Generator().manual_seed(seed))
    mask = magnitude_mask(x, density)
    k = int(round(density * x.numel()))
    assert int(mask.sum()) == k
    if 0 < k < x.numel():
        assert x.abs()[mask].min() >= x.abs()[~mask].max()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.floats(0.0, 2.0), min_size=2, max_size=2))
def test_invariants(seed: int, weights: list[float]) -> None:
    base, experts = _tensors(seed)
    # Zero weights give back the base; density 1 makes DARE and TIES-without-trim deterministic.
    torch.testing.assert_close(OPERATORS["task_arithmetic"].fn(base, experts, weight=[0.0, 0.0]), base)
    torch.testing.assert_close(
        OPERATORS["dare_linear"].fn(base, experts, density=[1.0, 1.0], weight=weights),
        OPERATORS["task_arithmetic"].fn(base, experts, weight=weights))
    # One expert through TIES at full density and weight w is task arithmetic with w.
    torch.testing.assert_close(
        OPERATORS["ties"].fn(base, experts[:1], density=[1.0], weight=weights[:1]),
        OPERATORS["task_arithmetic"].fn(base, experts[:1], weight=weights[:1]))
    # Sign consensus never leaves the range spanned by the weighted agreeing deltas' sum.
    deltas = torch.stack([e - base for e in experts])
    w = torch.tensor(weights).view(-1, 1, 1)
    merged = sign_consensus(deltas, w, normalize=False)
    assert bool(((merged * torch.sign((deltas * w).sum(0))) >= -1e-6).all())
