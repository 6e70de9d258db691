"""SLERP and Model Stock: coefficients from the Gram of whole tensors, then Σ c_j·θ_j.

Both need whole-tensor angles before their first output entry. Two paths per operator:

- native (float32 and bfloat16 on the CPU, the kernels built): ``gram.cpp``'s Gram, the
  coefficients from it by the formulas below (eager ops on float64 scalars on the host), and
  ``combine.cpp``'s sum (:func:`workers.streaming.combine`);
- one graph per tensor for everything else (GPU tensors, float16, float64, ``EVOMERGE_NATIVE=0``,
  more than 16 experts): the Gram (:func:`workers.gram.whole_gram`), the coefficients as device
  tensors and the sum into ``out``, handed to ``torch.compile`` (:class:`workers.fused.Compiled`)
  whole: a few kernels per tensor and no read back, the host never waits for the device. The
  formulas choose their branches with ``torch.where``, never by a Python test of a value. On the
  CPU below :data:`workers.fused.FUSE_MIN` entries, or where nothing compiles, the same function
  runs eagerly (same formulas, same elementwise bits; its Gram sums in another order).

The sum computes what ``combine.cpp`` computes: the coefficients rounded to the working dtype
(float32 for 16-bit sources, merge arithmetic 2), c_0·θ_0 rounded, then a fused multiply-add per
further term, rounded once to the output dtype at the end. The fused multiply-add is formed in
float64, where the product of two float32 values is exact, so one rounding to float32 is the
FMA's except where the float64 sum itself rounded onto a float32 midpoint (a double rounding:
about one entry in 2^29); a device that contracts the float64 multiply-add changes nothing, the
product being exact. So the graph gives the native path's bits except there and where a float64
Gram sum in another order moves a coefficient by one float32 ulp (tests/test_geometry.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.profiler import record_function

from evomerge.workers.kernels import gram, streaming
from evomerge.workers.kernels.fused import FUSE_MIN, Compiled
from evomerge.workers.kernels.precision import working_dtype


def slerp_coefficients(g: gram.Gram, t: Tensor) -> Tensor:
    """(c_0, c_1) in float64 from the Gram ``g`` of (θ_b, θ_1) and t (a float64 scalar):
    sin((1−t)Ω)/sin Ω and sin(tΩ)/sin Ω, or (1 − t, t) where |cos Ω| > 0.9995. A norm under 1e-8
    counts as 1 (a zero tensor: Ω = π/2)."""
    n0, n1 = g[0][0].sqrt(), g[1][1].sqrt()
    n0, n1 = torch.where(n0 > 1e-8, n0, 1.0), torch.where(n1 > 1e-8, n1, 1.0)
    dot = (g[0][1] / (n0 * n1)).clamp(-1.0, 1.0)
    omega = dot.acos()
    # mergekit's threshold, a literal: dynamo passes a module-level float into the graph as a tensor
    linear = dot.abs() > 0.9995
    # where Ω is 0 or π the spherical terms are 0/0: the linear branch is taken there, and where
    # never propagates the other
    return _once(torch.where(linear, 1.0 - t, ((1.0 - t) * omega).sin() / omega.sin()),
                 torch.where(linear, t, (t * omega).sin() / omega.sin()))


def model_stock_coefficients(g: gram.Gram) -> Tensor:
    """(1 − t, t/N) in float64 from the Gram ``g`` of the N task vectors: the base's coefficient
    and every expert's. t = N·cos / (1 + (N−1)·cos), cos the mean pairwise cosine
    (each clamped to [−1, 1], a product of norms under 1e-6 counting as 1e-6), t clamped to [0, 1]
    and 0 where |1 + (N−1)·cos| < 1e-6."""
    n = len(g)
    total = torch.zeros_like(g[0][0])  # summed from zero in pair order
    for i in range(n):
        for j in range(i + 1, n):
            norms = (g[i][i] * g[j][j]).sqrt()
            total = total + (g[i][j] / norms.clamp(min=1e-6)).clamp(-1.0, 1.0)
    cos = total / (n * (n - 1) // 2)
    denominator = 1 + (n - 1) * cos
    t = torch.where(denominator.abs() < 1e-6, 0.0, (n * cos / denominator).clamp(0.0, 1.0))
    return _once(1.0 - t, t / n)


def _once(*coeffs: Tensor) -> Tensor:
    """The coefficients as one small tensor: compiled, they are computed once into it. Left as
    scalars, inductor recomputes their chain (acos, sin...) in every vector step of the sum's
    loop: 2.4 ns/param more for SLERP on one core here."""
    return torch.stack(coeffs)


def _weighted_sum(terms: Sequence[Tensor], coeffs: Sequence[Tensor], out: Tensor) -> None:
    """Σ c_j·θ_j into ``out`` as ``combine.cpp`` computes it (see the module's docstring);
    ``coeffs``: one float64 scalar per term."""
    work = working_dtype(out.dtype)
    c = [coeff.to(work) for coeff in coeffs]  # as the native kernel's float coefficients
    acc = terms[0].to(work) * c[0]
    for x, coeff in zip(terms[1:], c[1:]):
        acc = (acc.double() + x.to(work).double() * coeff.double()).to(work)
    out.copy_(acc)


def _slerp(base: Tensor, expert: Tensor, t: Tensor, out: Tensor) -> None:
    """SLERP of flat tensors into ``out``: the device graph (``t``: one float64 on the device)."""
    c = slerp_coefficients(gram.whole_gram(None, [base, expert]), t[0])
    _weighted_sum([base, expert], [c[0], c[1]], out)


def _model_stock(base: Tensor, experts: list[Tensor], out: Tensor) -> None:
    """Model Stock of flat tensors into ``out``: the device graph."""
    c = model_stock_coefficients(gram.whole_gram(base, experts))
    _weighted_sum([base, *experts], [c[0], *[c[1]] * len(experts)], out)


_SLERP = Compiled(_slerp)
_MODEL_STOCK = Compiled(_model_stock)


def _compiles(tensors: Sequence[Tensor]) -> bool:
    """Whether the graph is compiled for these tensors (base first, ``out`` last): contiguous, on one
    device, and on the CPU at least FUSE_MIN entries (compiling costs seconds per variant)."""
    first = tensors[0]
    return ((first.device.type != "cpu" or first.numel() >= FUSE_MIN)
            and all(t.is_contiguous() and t.device == first.device for t in tensors))


def slerp(base: Tensor, expert: Tensor, t: float, out: Tensor | None, native_path: bool = True) -> Tensor:
    """SLERP of ``base`` and ``expert`` at ``t`` (see :func:`slerp_coefficients`), into ``out``
    when given; ``native_path`` False: the graph, whatever the tensors."""
    with record_function("evomerge.host"):
        t_host = torch.tensor([t], dtype=torch.float64)  # not 0-d: dynamo reads a 0-d tensor's value in its guards
    g = gram.gram(None, [base, expert]) if native_path else None
    if g is not None:  # the native path: coefficients on the host, nothing to wait for
        c0, c1 = slerp_coefficients(g, t_host[0]).tolist()
        return streaming.combine([(base, c0), (expert, c1)], out)
    result = torch.empty_like(base) if out is None else out
    with record_function("evomerge.h2d:1"):  # one 8-byte copy on a GPU
        t_dev = t_host.to(base.device)
    args = (base.reshape(-1), expert.reshape(-1), t_dev, result.view(-1))
    if not (_compiles([base, expert, result]) and _SLERP(*args)):
        _slerp(*args)
    return result


def model_stock(base: Tensor, experts: Sequence[Tensor], out: Tensor | None, native_path: bool = True) -> Tensor:
    """Model Stock of ``base`` and ``experts`` (see :func:`model_stock_coefficients`), into ``out``
    when given; ``native_path`` False: the graph, whatever the tensors."""
    g = gram.gram(base, experts) if native_path else None
    if g is not None:  # the native path
        c_base, c_expert = model_stock_coefficients(g).tolist()
        return streaming.combine([(base, c_base), *((e, c_expert) for e in experts)], out)
    result = torch.empty_like(base) if out is None else out
    args = (base.reshape(-1), [e.reshape(-1) for e in experts], result.view(-1))
    if not (_compiles([base, *experts, result]) and _MODEL_STOCK(*args)):
        _model_stock(*args)
    return result
