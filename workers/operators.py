"""Merge operators: one pure tensor function per method, registered by name.

Each operator merges one tensor: ``base`` (θ_b) and the experts' tensors (θ_i) with
per-expert parameters (one float per expert for this tensor). Operators declare their
parameters with bounds; the search space is built from those declarations alone.

Notation follows ../shared/DESIGN.md §2: δ_i = θ_i − θ_b, weight w_i, density d_i.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ParamSpec:
    """A per-expert parameter of an operator, searchable within [low, high]."""

    name: str
    low: float
    high: float
    default: float
    doc: str


@dataclass(frozen=True)
class Operator:
    """A registered merge method."""

    name: str
    fn: Callable[..., Tensor]
    params: tuple[ParamSpec, ...]
    random: bool  # draws random masks: needs a seeded generator
    doc: str

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)


OPERATORS: dict[str, Operator] = {}

WEIGHT = ParamSpec("weight", 0.0, 1.0, 0.5, "scale of the expert's contribution")
DENSITY = ParamSpec("density", 0.0, 1.0, 0.5, "fraction of the task vector kept")


def register(name: str, *params: ParamSpec, random: bool = False) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register ``fn`` as merge method ``name`` with its searchable parameters."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        OPERATORS[name] = Operator(name, fn, tuple(params), random, (fn.__doc__ or "").strip())
        return fn

    return wrap


def get_operator(name: str) -> Operator:
    try:
        return OPERATORS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r} (known: {', '.join(sorted(OPERATORS))})") from None


# --- building blocks ---------------------------------------------------------------


def _column(values: Sequence[float], like: Tensor) -> Tensor:
    """Per-expert scalars shaped to broadcast against a stack of expert tensors."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Keep the top ``density`` fraction of |δ| (TIES trim); exactly round(d·n) entries."""
    n = delta.numel()
    k = int(round(density * n))
    if k >= n:
        return torch.ones_like(delta, dtype=torch.bool)
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    if k > 0:
        mask[torch.topk(delta.abs().flatten(), k, sorted=False).indices] = True
    return mask.view_as(delta)


def dare_drop(delta: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE: drop each entry with probability 1 − d, rescale survivors by 1/d (Yu et al. 2024)."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def sign_consensus(deltas: Tensor, weights: Tensor, normalize: bool) -> Tensor:
    """TIES elect + disjoint merge over stacked (pruned) task vectors.

    The elected sign per entry is that of Σ w_i δ_i; only entries agreeing with it
    contribute. With ``normalize`` the sum is divided by the agreeing weights (mergekit's
    default); without it, weights act as free scales (Sakana found amplification helps).
    """
    weighted = deltas * weights
    elected = torch.sign(weighted.sum(dim=0))
    agree = torch.sign(deltas) == elected
    merged = (weighted * agree).sum(dim=0)
    if normalize:
        divisor = (weights * agree).sum(dim=0)
        merged = merged / torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    return merged


def _weighted_sum(deltas: Tensor, weights: Tensor, normalize: bool) -> Tensor:
    merged = (deltas * weights).sum(dim=0)
    if normalize:
        total = float(weights.sum())
        merged = merged / (total if abs(total) > 1e-8 else 1.0)
    return merged


# --- operators ---------------------------------------------------------------------


@register("linear", WEIGHT)
def linear(base: Tensor, experts: Sequence[Tensor], *, weight: Sequence[float], normalize: bool = True,
           generator: torch.Generator | None = None) -> Tensor:
    """Model soup: Σ w_i θ_i (divided by Σ w_i when normalized). The base is not used."""
    stack = torch.stack(list(experts))
    return _weighted_sum(stack, _column(weight, stack), normalize)


@register("task_arithmetic", WEIGHT)
def task_arithmetic(base: Tensor, experts: Sequence[Tensor], *, weight: Sequence[float],
                    normalize: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023): θ_b + Σ w_i δ_i."""
    deltas = torch.stack([e - base for e in experts])
    return base + _weighted_sum(deltas, _column(weight, deltas), normalize)


@register("ties", DENSITY, WEIGHT)
def ties(base: Tensor, experts: Sequence[Tensor], *, density: Sequence[float], weight: Sequence[float],
         normalize: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """TIES (Yadav et al. 2023): trim to top-d_i |δ_i|, elect sign, disjoint merge."""
    deltas = torch.stack([(e - base) * magnitude_mask(e - base, d) for e, d in zip(experts, density)])
    return base + sign_consensus(deltas, _column(weight, deltas), normalize)


@register("dare_linear", DENSITY, WEIGHT, random=True)
def dare_linear(base: Tensor, experts: Sequence[Tensor], *, density: Sequence[float], weight: Sequence[float],
                normalize: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """DARE then task arithmetic: θ_b + Σ w_i DARE(δ_i, d_i)."""
    deltas = torch.stack([dare_drop(e - base, d, generator) for e, d in zip(experts, density)])
    return base + _weighted_sum(deltas, _column(weight, deltas), normalize)


@register("dare_ties", DENSITY, WEIGHT, random=True)
def dare_ties(base: Tensor, experts: Sequence[Tensor], *, density: Sequence[float], weight: Sequence[float],
              normalize: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """DARE then TIES sign election: Sakana's parameter-space setting."""
    deltas = torch.stack([dare_drop(e - base, d, generator) for e, d in zip(experts, density)])
    return base + sign_consensus(deltas, _column(weight, deltas), normalize)
