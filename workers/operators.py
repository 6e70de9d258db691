"""Merge operators: one pure tensor function per declared method (workers/methods.py).

Each operator merges one tensor: ``base`` (θ_b) and the experts' tensors (θ_i), with the
parameters' values for this tensor (a tuple per expert for per-expert parameters, a float
for shared ones). It returns the merged tensor, written into ``out`` when given (the
worker passes the model's own parameter, so no temporary of the tensor's size is made
for the linear methods). Inputs are never modified.

Notation follows ../shared/DESIGN.md §2: δ_i = θ_i − θ_b, weight w_i, density d_i. Where
mergekit implements the same method, the deterministic results agree with it to float32
rounding; the random ones agree in expectation and keep rate (see :mod:`workers.sparsify`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.workers.kernels import fused, geometry, sparsify, streaming
from evomerge.workers.kernels.chunks import chunk_size
from evomerge.workers.kernels.precision import widened, working_dtype


_combine = streaming.combine


def _emit(result: Tensor, out: Tensor | None, like: Tensor) -> Tensor:
    """``result`` in ``out`` when given, else in ``like``'s dtype (a 16-bit merge computed in
    float32 is rounded here, once)."""
    if out is None:
        return result.to(like.dtype)
    return out if result is out else out.copy_(result)


def _della(base: Tensor, experts: Sequence[Tensor], density: Sequence[float], epsilon: Sequence[float],
           weight: Sequence[float], scale: float, normalize: bool, consensus: bool,
           generator: torch.Generator | None, out: Tensor | None) -> Tensor:
    """DELLA's MAGPRUNE drop of every δ_i, then the sum or the TIES election; whole tensors, so
    16-bit sources are widened first and the result rounded once."""
    wide, sources = widened(base, experts)
    deltas = [sparsify.della(e - wide, d, eps, generator) for e, d, eps in zip(sources, density, epsilon)]
    target = out if wide is base else None  # float32 sources: straight into ``out``
    return _emit(_task_vector_merge(wide, deltas, weight, scale, normalize, consensus, target), out, base)


def _guarded(total: float) -> float:
    return total if abs(total) >= 1e-8 else 1.0


def _task_vector_merge(base: Tensor, deltas: Sequence[Tensor], weight: Sequence[float], scale: float,
                       normalize: bool, consensus: bool, out: Tensor | None) -> Tensor:
    """θ_b + λ·merge(w_i·δ_i) of task vectors already formed (DELLA): one streaming pass."""
    return streaming.task_vector_merge(base, deltas, weight, scale=scale, normalize=normalize,
                                       consensus=consensus, out=out, deltas=True)


def _sparse_merge(base: Tensor, experts: Sequence[Tensor], weight: Sequence[float], scale: float,
                  normalize: bool, consensus: bool, out: Tensor | None, keep: Sequence[streaming.Keep]) -> Tensor:
    """θ_b + λ·merge(w_i·keep_i(θ_i − θ_b)), the task vectors formed chunk by chunk."""
    return streaming.task_vector_merge(base, experts, weight, scale=scale, normalize=normalize,
                                       consensus=consensus, out=out, keep=keep)


# --- linear family -----------------------------------------------------------------


def linear(base: Tensor, experts: Sequence[Tensor], *, weight: Sequence[float], normalize: bool = True,
           out: Tensor | None = None, **_: object) -> Tensor:
    """Model soup (Wortsman et al. 2022): Σ w_i θ_i, divided by Σ w_i when normalized.
    The base only donates the architecture; list it among the models to weight it."""
    total = _guarded(sum(weight)) if normalize else 1.0
    return _combine([(e, w / total) for e, w in zip(experts, weight)], out)


def task_arithmetic(base: Tensor, experts: Sequence[Tensor], *, weight: Sequence[float], scale: float = 1.0,
                    normalize: bool = False, out: Tensor | None = None, **_: object) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023): θ_b + λ Σ w_i δ_i, computed in one pass as
    (1 − Σc_i)·θ_b + Σ c_i·θ_i with c_i = λ·w_i (/ Σ w_i when normalized)."""
    total = _guarded(sum(weight)) if normalize else 1.0
    coeffs = [scale * w / total for w in weight]
    return _combine([(base, 1.0 - sum(coeffs)), *zip(experts, coeffs)], out)


# --- sparsified task vectors ---------------------------------------------------------


def ties(base: Tensor, experts: Sequence[Tensor], *, density: Sequence[float], weight: Sequence[float],
         scale: float = 1.0, normalize: bool = False, out: Tensor | None = None, **_: object) -> Tensor:
    """TIES (Yadav et al. 2023): trim each δ_i to its top-d_i magnitudes, elect the sign of
    Σ w_i δ_i, sum the agreeing entries (normalized: their weighted mean)."""
    return streaming.trimmed_merge(base, experts, weight, sparsify.ties_trims(density, base.numel()), scale=scale,
                                   normalize=normalize, consensus=True, out=out)


def dare_linear(base: Tensor, experts: Sequence[Tensor], *, density: Sequence[float], weight: Sequence[float],
                scale: float = 1.0, normalize: bool = False, generator: torch.Generator | None = None,
                out: Tensor | None = None, **_: object) -> Tensor:
    """DARE (Yu et al. 2024) then task arithmetic: θ_b + λ Σ w_i DARE(δ_i, d_i)."""
    draws = [sparsify.DareDraw.draw(d, generator) for d in density]
    return _sparse_merge(base, experts, weight, scale, normalize, False, out, draws)


def dare_ties(base: Tensor, experts: Sequence[Tensor], *, density: Sequence[float], weight: Sequence[float],
              scale: float = 1.0, normalize: bool = False, generator: torch.Generator | None = None,
              out: Tensor | None = None, **_: object) -> Tensor:
    """DARE then TIES sign election: Sakana's parameter-space setting."""
    draws = [sparsify.DareDraw.draw(d, generator) for d in density]
    return _sparse_merge(base, experts, weight, scale, normalize, True, out, draws)


def breadcrumbs(base: Tensor, experts: Sequence[Tensor], *, density: Sequence[float], gamma: Sequence[float],
                weight: Sequence[float], scale: float = 1.0, normalize: bool = False,
                out: Tensor | None = None, **_: object) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024): mask both the top-γ outliers and the
    smallest entries of each δ_i, then task arithmetic."""
    return streaming.trimmed_merge(base, experts, weight, sparsify.breadcrumbs_trims(density, gamma, base.numel()),
                                   scale=scale, normalize=normalize, consensus=False, out=out)


def breadcrumbs_ties(base: Tensor, experts: Sequence[Tensor], *, density: Sequence[float],
                     gamma: Sequence[float], weight: Sequence[float], scale: float = 1.0, normalize: bool = False,
                     out: Tensor | None = None, **_: object) -> Tensor:
    """Model Breadcrumbs masks, then TIES sign election."""
    return streaming.trimmed_merge(base, experts, weight, sparsify.breadcrumbs_trims(density, gamma, base.numel()),
                                   scale=scale, normalize=normalize, consensus=True, out=out)


def della(base: Tensor, experts: Sequence[Tensor], *, density: Sequence[float], epsilon: Sequence[float],
          weight: Sequence[float], scale: float = 1.0, normalize: bool = False,
          generator: torch.Generator | None = None, out: Tensor | None = None, **_: object) -> Tensor:
    """DELLA (Deep et al. 2024): MAGPRUNE drop with magnitude-ranked keep probabilities in
    [d − ε, d + ε] and 1/p rescale, then TIES sign election and fusion."""
    return _della(base, experts, density, epsilon, weight, scale, normalize, True, generator, out)


def della_linear(base: Tensor, experts: Sequence[Tensor], *, density: Sequence[float], epsilon: Sequence[float],
                 weight: Sequence[float], scale: float = 1.0, normalize: bool = False,
                 generator: torch.Generator | None = None, out: Tensor | None = None, **_: object) -> Tensor:
    """DELLA's MAGPRUNE drop, then task arithmetic (no sign election)."""
    return _della(base, experts, density, epsilon, weight, scale, normalize, False, generator, out)


# --- masks from agreement -----------------------------------------------------------

_PCB_CLIP = 0.01  # PCB clips the 1 % smallest and largest magnitudes per task (official pcb_ES code)


def consensus(base: Tensor, experts: Sequence[Tensor], *, tall: Sequence[float], weight: Sequence[float],
              k: float = 2.0, scale: float = 1.0, normalize: bool = False, out: Tensor | None = None,
              **_: object) -> Tensor:
    """Consensus merging with TALL masks (Wang et al. 2024, eqs. 5 and 8): τ = Σ w_i δ_i; expert
    t claims the entries where |w_t δ_t| > λ_t·|τ − w_t δ_t|; entries claimed by fewer than k
    experts are dropped: θ_b + λ·(mask ⊙ τ). With all w_i = 1 this is the paper's form."""
    result = torch.empty_like(base) if out is None else out
    need = math.floor(k + 0.5)
    if fused.takes([base, *experts, result]) and fused.consensus_merge(
            base, experts, weight, tall, need, _guarded(sum(weight)) if normalize else None, scale, result):
        return result
    flat_base, flat_out, flats = base.reshape(-1), result.view(-1), [e.reshape(-1) for e in experts]
    size = chunk_size(base.device)
    wide = working_dtype(base.dtype)
    for start in range(0, flat_base.numel(), size):  # the whole-tensor ops, one chunk at a time
        b = flat_base[start:start + size].to(wide)  # 16-bit: every δ in float32, rounded once at the end
        weighted = [(f[start:start + size] - b).mul_(w) for f, w in zip(flats, weight)]
        total = torch.zeros_like(b)
        for u in weighted:
            total += u
        votes = torch.zeros_like(total, dtype=torch.int32)
        for u, lam in zip(weighted, tall):
            votes += u.abs() > (total - u).abs_().mul_(lam)
        total = total.mul_(votes >= need)
        if normalize:
            total /= _guarded(sum(weight))
        flat_out[start:start + size].copy_(total.mul_(scale).add_(b))
    return result


def _minmax(x: Tensor) -> Tensor:
    low, high = x.min(), x.max()
    return (x - low) / (high - low) if bool(high > low) else torch.zeros_like(x)


def _kth(x: Tensor, index: int) -> Tensor:
    """The value at 0-based position ``index`` of ``x`` sorted ascending (a selection, no sort)."""
    return torch.kthvalue(x, index + 1).values


def pcb(base: Tensor, experts: Sequence[Tensor], *, ratio: float, weight: Sequence[float], scale: float = 1.0,
        out: Tensor | None = None, **_: object) -> Tensor:
    """PCB merging (Du et al. 2024, §3, as in the official pcb_ES code), per tensor: clip each
    |δ_i| to its 1–99 % quantiles; intra-balance exp(n·minmax(|δ_i|)²); inter-balance
    Σ_j tanh(δ̂_i ⊙ δ̂_j) with δ̂ the signed min-max magnitudes; keep the top ``ratio`` of the
    product, min-max rescaled to scores s_i; θ_b + λ·Σ w_i s_i δ̃_i / Σ s_i. The merge is a
    weighted mean by construction, so ``normalize`` does not apply."""
    n, numel = len(experts), base.numel()
    wide, sources = widened(base, experts)
    clipped, signed = [], []
    for e in sources:
        delta = (e - wide).flatten()
        magnitude = delta.abs()
        low, high = int(numel * _PCB_CLIP), int(numel * (1 - _PCB_CLIP)) - 1
        if high > low:
            magnitude = magnitude.clamp(_kth(magnitude, low), _kth(magnitude, high))
        sign = torch.sign(delta)
        clipped.append(sign * magnitude)
        signed.append(sign * _minmax(magnitude))
    cut = int(numel * (1 - ratio))
    merged, total = torch.zeros_like(clipped[0]), torch.zeros_like(clipped[0])
    for i in range(n):
        if cut >= numel:
            continue  # keeps nothing
        intra = torch.exp(n * signed[i].square())
        inter = sum((torch.tanh(signed[i] * signed[j]) for j in range(n)), torch.zeros_like(intra))
        balance = intra * inter
        score = _minmax(balance.clamp_(min=_kth(balance, cut)))
        merged += score * clipped[i] * weight[i]
        total += score
    merged = merged.div_(total.clamp_(min=1e-12)).view_as(base)
    return _emit(merged.mul_(scale).add_(wide), out, base)


# --- geometry ------------------------------------------------------------------------


def slerp(base: Tensor, experts: Sequence[Tensor], *, t: float, out: Tensor | None = None,
          **_: object) -> Tensor:
    """Spherical interpolation (Shoemake 1985) of the flattened base and expert tensors:
    sin((1−t)Ω)/sin Ω·θ_b + sin(tΩ)/sin Ω·θ_1 with cos Ω the cosine of the two; linear
    interpolation when they are nearly parallel (|cos Ω| > 0.9995, mergekit's threshold).
    The cosine comes from float64 sums over the whole tensor, then one pass writes the result
    (:mod:`workers.geometry`: native kernels on the CPU, one compiled graph elsewhere)."""
    return geometry.slerp(base, experts[0], t, out)


def model_stock(base: Tensor, experts: Sequence[Tensor], *, out: Tensor | None = None, **_: object) -> Tensor:
    """Model Stock (Jang et al. 2024, eq. 6): t = N·cos θ / (1 + (N−1)·cos θ) with cos θ the
    mean pairwise cosine of the task vectors (whole tensor); θ = t·mean(θ_i) + (1−t)·θ_b.
    t is clamped to [0, 1]: when the task vectors point apart (cos θ < 0) mergekit extrapolates
    away from the experts (t < 0, unbounded near cos θ = −1/(N−1)); we keep the base instead.
    No parameters to search (:mod:`workers.geometry`)."""
    return geometry.model_stock(base, experts, out)


def swap(base: Tensor, experts: Sequence[Tensor], *, select: Sequence[float], out: Tensor | None = None,
         **_: object) -> Tensor:
    """Layer swapping (Bandarkar et al. 2024): each tensor is copied whole from one source,
    the expert with the highest ``select`` if it exceeds 0.5, else the base. With genes per
    layer group (``granularity: layer_group``, ``group_size: 1``) this is a per-layer choice."""
    best = max(range(len(experts)), key=lambda i: select[i])
    chosen = experts[best] if select[best] > 0.5 else base
    return chosen.clone() if out is None else out.copy_(chosen)


# --- transforms ------------------------------------------------------------------------


def lines(merged: Tensor, base: Tensor, depth: float, *, alpha: float, beta: float) -> Tensor:
    """LiNeS (Wang et al. 2025, eq. 2): scale the merged task vector of a layer at depth
    ℓ/(L−1) by α + β·ℓ/(L−1), so shallow layers stay near the base. Tensors outside the
    layers (embeddings, final norm, head) get α, as in the LiNeS code
    (:func:`workers.layout.depth_fraction`)."""
    return merged.sub_(base).mul_(alpha + beta * depth).add_(base)
