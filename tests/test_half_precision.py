"""Merges in 16-bit dtypes (a bf16 GPU worker) round once, not once per model.

The reference is each operator's formula in float64 on the very same 16-bit inputs; the
merged tensor must lie within one unit in the last place of it (plus float32 slack where
terms cancel). Summing six experts with a rounding after each term (bf16 keeps 8 significant
bits) misses that bound on 1–17 % of the entries (checked against the old code).
Tensors are larger than one streaming chunk, so the chunk loop is covered.
"""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.workers.registry import OPERATORS
from evomerge.workers.kernels.sparsify import della_probabilities

SHAPE = (700, 512)  # 358 400 entries: more than one chunk of the streaming combination
WEIGHTS = (0.3, 0.25, 0.2, 0.15, 0.35, 0.4)


def _models(dtype: torch.dtype, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    base = torch.randn(SHAPE, generator=g)
    experts = [base + 0.05 * torch.randn(SHAPE, generator=g) for _ in range(n)]
    return base.to(dtype), [e.to(dtype) for e in experts]


def _within_one_ulp(actual: torch.Tensor, terms: list[torch.Tensor]) -> None:
    """|actual − Σ terms| ≤ one spacing of ``actual``'s dtype at the exact sum (float64) plus the
    float32 accumulation's own error, a few float32 ulps of Σ|terms| (matters only where the
    terms cancel). Below the smallest normal number the spacing is the subnormal one."""
    exact = sum(terms)
    info = torch.finfo(actual.dtype)
    spacing = info.eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp(min=info.smallest_normal))))
    slack = 4 * torch.finfo(torch.float32).eps * sum(t.abs() for t in terms)
    err = (actual.double() - exact).abs()
    bad = int((err > spacing + slack).sum())
    assert bad == 0, f"{bad} of {exact.numel()} entries off by more than one ulp (max {float(err.max()):.3g})"


def _run(name: str, base: torch.Tensor, experts: list[torch.Tensor], **params: object) -> torch.Tensor:
    out = torch.empty_like(base)
    result = OPERATORS[name].fn(base, experts, normalize=False, out=out, **params)
    assert result.dtype == base.dtype
    return result


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_rounds_once(dtype: torch.dtype) -> None:
    base, experts = _models(dtype, len(WEIGHTS))
    terms = [w * e.double() for w, e in zip(WEIGHTS, experts)]
    _within_one_ulp(_run("linear", base, experts, weight=WEIGHTS), terms)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_task_arithmetic_rounds_once(dtype: torch.dtype) -> None:
    base, experts = _models(dtype, len(WEIGHTS))
    # the operator's one-pass form (1 − Σw)·θ_b + Σ w·θ_i
    terms = [(1 - sum(WEIGHTS)) * base.double(), *(w * e.double() for w, e in zip(WEIGHTS, experts))]
    _within_one_ulp(_run("task_arithmetic", base, experts, weight=WEIGHTS, scale=1.0), terms)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_task_vector_sum_rounds_once(dtype: torch.dtype) -> None:
    """DARE at density 1 keeps every entry: the task-vector path's sum θ_b + Σ w_i δ_i, with δ_i
    formed in float32 from the widened sources (merge arithmetic 2), so against the exact δ_i."""
    base, experts = _models(dtype, len(WEIGHTS))
    terms = [base.double(), *(w * (e.double() - base.double()) for w, e in zip(WEIGHTS, experts))]
    merged = _run("dare_linear", base, experts, weight=WEIGHTS, density=(1.0,) * len(WEIGHTS), scale=1.0,
                  generator=torch.Generator().manual_seed(0))
    _within_one_ulp(merged, terms)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_slerp_angle_and_sum_in_float32(dtype: torch.dtype) -> None:
    """The angle comes from float32 chunk dot products (a 16-bit dot product rounds its
    running sum), and the two-term sum is rounded once."""
    base, (expert,) = _models(dtype, 1)
    a, b = base.double().flatten(), expert.double().flatten()
    cos = float(a @ b / (a.norm() * b.norm()))
    t = 0.3
    omega = math.acos(cos)
    assert abs(cos) <= 0.9995  # the spherical branch, not the linear fallback
    terms = [math.sin((1 - t) * omega) / math.sin(omega) * base.double(),
             math.sin(t * omega) / math.sin(omega) * expert.double()]
    _within_one_ulp(_run("slerp", base, [expert], t=t), terms)


def test_della_ranks_stay_integers_in_bf16() -> None:
    """Keep probabilities rise linearly with the rank of |δ| in its row: in bf16 rank 300 and
    rank 301 would be the same number; computed in float32 each of the row's ranks is distinct."""
    delta = torch.randn(3, 1000, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    probs = della_probabilities(delta, 0.5, 0.4)
    assert probs.dtype == torch.float32
    for row, p in zip(delta.float(), probs):
        assert len(set(p.tolist())) == row.numel()  # one level per rank (ties in |δ| broken arbitrarily)
        by_probability = row.abs()[p.argsort()]
        assert bool((by_probability[1:] >= by_probability[:-1]).all())  # larger |δ|, larger probability
        assert float(p.max()) == pytest.approx(0.9) and float(p.min()) == pytest.approx(0.1)
