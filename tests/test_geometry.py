"""SLERP and Model Stock on the device graph (workers/kernels/geometry.py: Gram, coefficients and sum as
one compiled graph per tensor, the path of GPU tensors, float16 and EVOMERGE_NATIVE=0) against
the native CPU path (gram.cpp + combine.cpp), run here on the CPU.

Stated tolerance: the coefficients may differ in their last float32 ulp (the two float64 Gram
sums run in different orders), so a float32 merge is held within 2 float32 ulps of Σ|c_j·θ_j|
of the native one, a bfloat16 merge within one bfloat16 ulp; in practice every case below is
bit-identical. On one device the graph is deterministic: two runs give the same bits."""

from __future__ import annotations

import pytest
import torch

from evomerge.workers.kernels import fused, geometry, gram
from tests.helpers import merge_launches

BIG = fused.FUSE_MIN + 1001  # compiled on the CPU (from FUSE_MIN); smaller tensors run the graph eagerly


def _case(name: str, dtype: torch.dtype, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sources for one case: SLERP's spherical and nearly parallel (|cos| > 0.9995: the linear
    fallback) branches; Model Stock with aligned task vectors, a negative mean cosine (t clamped
    to 0: the base) and exactly opposed ones (1 + (N−1)·cos = 0: t = 0)."""
    g = torch.Generator().manual_seed(len(name) + n)
    base = torch.randn(n, generator=g)
    noise = [torch.randn(n, generator=g) for _ in range(3)]
    shared = torch.randn(n, generator=g)
    experts = {
        "slerp": [base * 0.5 + noise[0]],
        "slerp_parallel": [base * 1.01 + 1e-3 * noise[0]],
        "model_stock": [base + 0.1 * (shared + noise[i]) for i in range(3)],
        "model_stock_negative": [base + 0.1 * (shared + 0.2 * noise[0]), base - 0.1 * (shared + 0.2 * noise[1])],
        "model_stock_opposed": [base + 0.1 * shared, base - 0.1 * shared],
    }[name]
    return base.to(dtype), [e.to(dtype) for e in experts]


def _merge(name: str, base: torch.Tensor, experts: list[torch.Tensor], native_path: bool) -> torch.Tensor:
    out = torch.full_like(base, float("nan"))
    if name.startswith("slerp"):
        return geometry.slerp(base, experts[0], 0.3, out, native_path=native_path)
    return geometry.model_stock(base, experts, out, native_path=native_path)


def _terms(name: str, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """Σ|c_j·θ_j| with the native path's coefficients (the scale of the sum's rounding)."""
    if name.startswith("slerp"):
        g = gram.gram(None, [base, experts[0]])
        assert g is not None
        coeffs = geometry.slerp_coefficients(g, torch.tensor(0.3, dtype=torch.float64)).tolist()
    else:
        g = gram.gram(base, experts)
        assert g is not None
        c_base, c_expert = geometry.model_stock_coefficients(g).tolist()
        coeffs = [c_base, *[c_expert] * len(experts)]
    return sum(abs(c) * s.double().abs() for c, s in zip(coeffs, [base, *experts]))


CASES = ["slerp", "slerp_parallel", "model_stock", "model_stock_negative", "model_stock_opposed"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("n", [5003, BIG], ids=["eager", "compiled"])
def test_the_graph_matches_the_native_path(name: str, dtype: torch.dtype, n: int) -> None:
    base, experts = _case(name, dtype, n)
    native = _merge(name, base, experts, native_path=True)
    graph = _merge(name, base, experts, native_path=False)
    err = (graph.double() - native.double()).abs()
    if dtype == torch.float32:
        bound = 2 * torch.finfo(torch.float32).eps * _terms(name, base, experts)
    else:  # one bfloat16 ulp at the native value (the subnormal spacing below the smallest normal)
        info = torch.finfo(dtype)
        bound = info.eps * torch.exp2(torch.floor(torch.log2(native.double().abs().clamp(min=info.smallest_normal))))
    assert bool((err <= bound).all()), f"{int((err > bound).sum())} entries beyond the tolerance"
    if name in ("model_stock_negative", "model_stock_opposed"):  # t clamped to 0: the base, on both paths
        assert torch.equal(graph, base) and torch.equal(native, base)
    if name == "slerp_parallel":  # the linear fallback: 0.7·θ_b + 0.3·θ_1, two roundings as combine's
        linear = (0.7 * base.float() + 0.3 * experts[0].float()).to(dtype)
        assert float((graph.double() - linear.double()).abs().max()) <= 1e-5 * float(linear.double().abs().max())


@pytest.mark.parametrize("name", CASES)
def test_the_coefficients_differ_by_one_float32_ulp_at_most(name: str) -> None:
    """From the native Gram and from the graph's (whole_gram), rounded to float32 as the sums use them."""
    base, experts = _case(name, torch.bfloat16, BIG)
    t = torch.tensor(0.3, dtype=torch.float64)
    if name.startswith("slerp"):
        native, whole = gram.gram(None, [base, experts[0]]), gram.whole_gram(None, [base, experts[0]])
        assert native is not None
        pair = [geometry.slerp_coefficients(native, t), geometry.slerp_coefficients(whole, t)]
    else:
        native, whole = gram.gram(base, experts), gram.whole_gram(base, experts)
        assert native is not None
        pair = [geometry.model_stock_coefficients(native), geometry.model_stock_coefficients(whole)]
    a, b = (c.float() for c in pair)
    assert bool(((a - b).abs() <= torch.finfo(torch.float32).eps * a.abs()).all()), (a, b)


@pytest.mark.parametrize("n", [5003, BIG], ids=["eager", "compiled"])
def test_two_runs_give_the_same_bits(n: int) -> None:
    for name in ("slerp", "model_stock"):
        base, experts = _case(name, torch.bfloat16, n)
        one = _merge(name, base, experts, native_path=False)
        assert torch.equal(_merge(name, base, experts, native_path=False).view(torch.int16), one.view(torch.int16))


def test_the_compiled_graph_equals_the_same_function_run_eagerly() -> None:
    """The fallback where nothing compiles is the graph's function uncompiled: the same bits here
    (its Gram sums run in another order; the float32 coefficients do not show it)."""
    for name in ("slerp", "model_stock"):
        base, experts = _case(name, torch.bfloat16, BIG)
        compiled = _merge(name, base, experts, native_path=False)
        eager = torch.full_like(base, float("nan"))
        if name == "slerp":
            geometry._slerp(base, experts[0], torch.tensor([0.3], dtype=torch.float64), eager)
        else:
            geometry._model_stock(base, experts, eager)
        assert torch.equal(compiled.view(torch.int16), eager.view(torch.int16))


def test_the_graph_launches_at_most_8_kernels_and_never_syncs() -> None:
    """benchmarks/merge_launches.py's count for one bfloat16 tensor of each operator."""
    for name, (launches, syncs) in merge_launches(("slerp", "model_stock")).items():
        assert launches >= 1, name  # the kernel was seen
        assert launches <= 8 and syncs == 0, (name, launches, syncs)
