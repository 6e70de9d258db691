"""Sparsification of task vectors: which entries of δ = θ − θ_b an operator keeps.

Each function works on one tensor and returns a new one (or a boolean mask); none
touches its input. Counts follow mergekit's convention (k = ⌊d·n⌋, at least one entry
when d > 0) so deterministic operators agree with mergekit bit for bit; the random ones
rescale survivors by the inverse keep probability as in the papers (mergekit instead
rescales the whole tensor to its former L1 norm: same expectation in aggregate).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def keep_count(density: float, n: int) -> int:
    """Entries kept at ``density``: ⌊d·n⌋, at least 1 when 0 < d < 1 (mergekit's rule)."""
    if density >= 1.0:
        return n
    if density <= 0.0 or n == 0:
        return 0
    return max(1, int(density * n))


def top_magnitude_mask(delta: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` entries of largest |δ| (exactly k)."""
    n = delta.numel()
    if k >= n:
        return torch.ones_like(delta, dtype=torch.bool)
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    if k > 0:
        mask[torch.topk(delta.abs().flatten(), k, sorted=False).indices] = True
    return mask.view_as(delta)


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """TIES trim (Yadav et al. 2023, §3): keep the top-d fraction of |δ|."""
    return top_magnitude_mask(delta, keep_count(density, delta.numel()))


def breadcrumbs_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024): drop the top-γ outliers of |δ| and the
    smallest entries, keeping ⌊d·n⌋ entries in the band between (mergekit's parametrisation:
    the paper's bottom fraction β is 1 − d − γ). When d + γ > 1 fewer outliers are dropped."""
    n = delta.numel()
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    kept = int(density * n)
    top = min(int(gamma * n), n - kept)
    if top == 0:
        return top_magnitude_mask(delta, kept)
    # the band is the kept+top largest minus the top largest *of those*: one selection over the
    # tensor, a small one over its result, and ties in |δ| cannot make the two cuts disagree
    values, indices = torch.topk(delta.abs().flatten(), kept + top, sorted=False)
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[indices] = True
    mask[indices[torch.topk(values, top, sorted=False).indices]] = False
    return mask.view_as(delta)


def _uniform(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniforms in float32 whatever the weights' dtype (a bf16 grid would bias the keep rate)."""
    return torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)


def dare(delta: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE (Yu et al. 2024, eq. 2): drop each entry with probability 1 − d, rescale the
    survivors by 1/d so the expectation is δ."""
    if density >= 1.0:
        return delta.clone()
    if density <= 0.0:
        return torch.zeros_like(delta)
    keep = _uniform(delta, generator) < density
    return (delta * keep).mul_(1.0 / density)


def della_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MAGPRUNE keep probabilities (Deep et al. 2024, §3.1): within each row, entries
    ranked by |δ| get probabilities spread linearly over [d − ε, d + ε], larger |δ| kept more
    often. 1-D tensors are one row. Clamped to [0, 1]; float32 whatever ``delta``'s dtype."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    cols = rows.shape[1]
    order = rows.abs().argsort(dim=1)
    # float32 ranks: a bf16 rank stops being an integer above 256 (rows have thousands)
    ranks = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    ranks.scatter_(1, order, torch.arange(cols, dtype=torch.float32, device=rows.device).expand_as(order).contiguous())
    spread = ranks / (cols - 1) if cols > 1 else torch.zeros_like(ranks)
    probs = (density - epsilon) + 2.0 * epsilon * spread
    return probs.clamp(0.0, 1.0).reshape(delta.shape)


def della(delta: Tensor, density: float, epsilon: float, generator: torch.Generator | None) -> Tensor:
    """DELLA drop-and-rescale: keep entry j with probability p_j, rescale by 1/p_j."""
    if density >= 1.0:
        return delta.clone()
    if density <= 0.0:
        return torch.zeros_like(delta)
    probs = della_probabilities(delta, density, epsilon)
    keep = _uniform(delta, generator) < probs  # never where p = 0, so dividing by the clamped p is safe
    return (delta * keep).div_(probs.clamp_(min=torch.finfo(probs.dtype).tiny))


def disjoint_merge(weighted: Sequence[Tensor], weights: Sequence[float], normalize: bool) -> Tensor:
    """TIES elect + disjoint merge (Yadav et al. 2023, §3) of the weighted task vectors u_i = w_i·δ_i.

    The elected sign is that of Σ_i u_i, +1 where the sum is zero (mergekit's rule); only
    entries whose sign agrees contribute (zeros never do). Streamed over the experts with
    two running sums, P = Σ max(u_i, 0) and N = Σ min(u_i, 0): the elected sum is P where
    P + N ≥ 0, else N, so no stack of the experts and no per-expert masks are built. With
    ``normalize`` the result is divided by the agreeing experts' weights (the paper's mean).
    """
    positive, negative = torch.zeros_like(weighted[0]), torch.zeros_like(weighted[0])
    for u in weighted:
        positive += u.clamp(min=0)
        negative += u.clamp(max=0)
    elected_positive = (positive + negative) >= 0
    merged = torch.where(elected_positive, positive, negative)
    if normalize:
        divisor = torch.zeros_like(merged)
        for u, w in zip(weighted, weights):
            divisor += torch.where(elected_positive, u > 0, u < 0) * w
        merged /= divisor.masked_fill_(divisor == 0, 1.0)
    return merged
