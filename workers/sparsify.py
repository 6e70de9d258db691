"""Sparsification of task vectors: which entries of δ = θ − θ_b an operator keeps.

Each function works on one tensor and returns a new one (or a boolean mask); none
touches its input. Counts follow mergekit's convention (k = ⌊d·n⌋, at least one entry
when d > 0) so deterministic operators agree with mergekit bit for bit; the random ones
rescale survivors by the inverse keep probability as in the papers (mergekit instead
rescales the whole tensor to its former L1 norm: same expectation in aggregate).
"""

from __future__ import annotations

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
    # one ranking for both cuts, so ties in |δ| cannot make the two top-k sets disagree
    ranked = torch.topk(delta.abs().flatten(), kept + top, sorted=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[ranked[top:]] = True
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
    return torch.where(keep, delta * (1.0 / density), torch.zeros_like(delta))


def della_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MAGPRUNE keep probabilities (Deep et al. 2024, §3.1): within each row, entries
    ranked by |δ| get probabilities spread linearly over [d − ε, d + ε], larger |δ| kept more
    often. 1-D tensors are one row. Clamped to [0, 1]."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    cols = rows.shape[1]
    order = rows.abs().argsort(dim=1)
    ranks = torch.empty_like(rows)
    ranks.scatter_(1, order, torch.arange(cols, dtype=rows.dtype, device=rows.device).expand_as(order).contiguous())
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
    keep = _uniform(delta, generator) < probs
    return torch.where(keep, delta / probs.clamp(min=torch.finfo(probs.dtype).tiny), torch.zeros_like(delta))


def elect_signs(weighted: Tensor) -> Tensor:
    """TIES elect (Yadav et al. 2023, §3): the sign of Σ_i w_i δ_i per entry, +1 where the sum
    is zero (mergekit's tie rule). ``weighted`` stacks the experts on dim 0."""
    return torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)


def disjoint_merge(weighted: Tensor, weights: Tensor, normalize: bool) -> Tensor:
    """TIES disjoint merge: sum the entries whose sign agrees with the elected one. With
    ``normalize``, divide by the agreeing experts' weights (the paper's disjoint mean)."""
    agree = torch.sign(weighted) == elect_signs(weighted)
    merged = (weighted * agree).sum(dim=0)
    if normalize:
        divisor = (weights * agree).sum(dim=0)
        merged = merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return merged
