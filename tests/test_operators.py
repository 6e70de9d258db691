"""Merge operators against independent references written from the papers' definitions.

The references below are plain Python loops over entries (or short float64 numpy), written
from /work/notes/operators_literature.md and the operators' docstrings; none of them calls
``workers.sparsify`` for the thing under test. Random operators are checked statistically
(keep rate, unbiasedness, DELLA's rank-linear keep probability) and for reproducibility.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.workers.kernels import fused, sparsify
from evomerge.workers.layout import depth_fraction
from evomerge.workers.registry import OPERATORS, TRANSFORMS

torch.set_num_threads(1)

RANDOM_OPS = ("dare_linear", "dare_ties", "della", "della_linear")
TASK_VECTOR_OPS = tuple(name for name, op in OPERATORS.items() if op.task_vector)
FAST = settings(max_examples=30, deadline=None)

# --- helpers ------------------------------------------------------------------------------


def models(seed: int, n: int = 2, shape: tuple[int, ...] = (4, 6)) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A random base and ``n`` experts around it (continuous values: no ties in |δ|)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) for _ in range(n)]


def valid_experts(name: str, n: int) -> int:
    """``n`` clipped to the operator's allowed expert count."""
    low, high = OPERATORS[name].experts
    return max(low, n if high is None else min(n, high))


def default_params(name: str, n: int, **overrides: object) -> dict[str, object]:
    """Every parameter of operator ``name`` at its default (a tuple per expert where per-expert)."""
    params: dict[str, object] = {}
    for spec in OPERATORS[name].params:
        params[spec.name] = (spec.default,) * n if spec.per_expert else spec.default
    params.update(overrides)
    return params


def call(name: str, base: torch.Tensor, experts: Sequence[torch.Tensor], *, normalize: bool = False,
         seed: int = 0, out: torch.Tensor | None = None, **overrides: object) -> torch.Tensor:
    """Run operator ``name`` with defaults for unspecified parameters and a seeded generator."""
    op = OPERATORS[name]
    generator = torch.Generator().manual_seed(seed) if op.random else None
    return op.fn(base, list(experts), normalize=normalize, generator=generator, out=out,
                 **default_params(name, len(experts), **overrides))


def close(actual: torch.Tensor, expected: object, tol: float = 1e-5) -> None:
    expected_t = torch.as_tensor(np.asarray(expected), dtype=actual.dtype).reshape(actual.shape)
    torch.testing.assert_close(actual, expected_t, rtol=tol, atol=tol)


def flat(x: torch.Tensor) -> list[float]:
    return [float(v) for v in x.double().flatten()]


def deltas_of(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> list[list[float]]:
    """The task vectors δ_i = θ_i − θ_b as flat Python lists."""
    return [[e - b for e, b in zip(flat(x), flat(base))] for x in experts]


def sgn(x: float) -> int:
    return (x > 0) - (x < 0)


# --- references ---------------------------------------------------------------------------


def ref_keep_count(d: float, n: int) -> int:
    """k = max(1, ⌊d·n⌋) for 0 < d < 1; 0 at d <= 0; n at d >= 1."""
    if d >= 1:
        return n
    if d <= 0 or n == 0:
        return 0
    return max(1, math.floor(d * n))


def by_magnitude(x: list[float]) -> list[int]:
    """Indices of ``x`` from the largest |x| down."""
    return sorted(range(len(x)), key=lambda j: -abs(x[j]))


def ref_top_k(x: list[float], d: float) -> list[float]:
    keep = set(by_magnitude(x)[:ref_keep_count(d, len(x))])
    return [v if j in keep else 0.0 for j, v in enumerate(x)]


def ref_breadcrumbs(x: list[float], d: float, gamma: float) -> list[float]:
    """Keep ⌊d·n⌋ entries ranked by |δ| after skipping the top ⌊γ·n⌋ (fewer if d + γ > 1)."""
    n = len(x)
    if d >= 1:
        return list(x)
    kept = math.floor(d * n)
    top = min(math.floor(gamma * n), n - kept)
    keep = set(by_magnitude(x)[top:top + kept])
    return [v if j in keep else 0.0 for j, v in enumerate(x)]


def ref_sum(deltas: list[list[float]], w: Sequence[float], normalize: bool) -> list[float]:
    """Σ w_i δ_i, divided by Σ w_i when normalized."""
    total = sum(w) if normalize and sum(w) != 0 else 1.0
    return [sum(wi * d[j] for wi, d in zip(w, deltas)) / total for j in range(len(deltas[0]))]


def ref_ties_merge(deltas: list[list[float]], w: Sequence[float], normalize: bool) -> list[float]:
    """TIES elect + disjoint merge, entry by entry (mergekit's rule)."""
    merged = []
    for j in range(len(deltas[0])):
        u = [wi * d[j] for wi, d in zip(w, deltas)]
        elected = 1 if sum(u) >= 0 else -1
        agree = [sgn(ui) == elected for ui in u]
        num = sum(ui for ui, a in zip(u, agree) if a)
        den = sum(wi for wi, a in zip(w, agree) if a)
        merged.append(num / (den if den != 0 else 1.0) if normalize else num)
    return merged


def finish(base: torch.Tensor, merged: list[float], scale: float = 1.0) -> list[float]:
    """θ_b + λ·merged."""
    return [b + scale * m for b, m in zip(flat(base), merged)]


def ref_della_probs(x: torch.Tensor, d: float, eps: float) -> np.ndarray:
    """Per row (1-D = one row): p = d − ε + 2ε·rank/(c − 1), rank 0 = smallest |δ|, clamped."""
    rows = x.double().numpy().reshape(1, -1) if x.dim() < 2 else x.double().numpy().reshape(x.shape[0], -1)
    probs = np.empty_like(rows)
    c = rows.shape[1]
    for r, row in enumerate(rows):
        for rank, j in enumerate(sorted(range(c), key=lambda j: abs(row[j]))):
            probs[r, j] = d - eps + 2 * eps * (rank / (c - 1) if c > 1 else 0.0)
    return np.clip(probs, 0.0, 1.0).reshape(tuple(x.shape))


def ref_slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> np.ndarray:
    """mergekit's slerp in float64: lerp when |cos Ω| > 0.9995."""
    a, b = v0.double().numpy().ravel(), v1.double().numpy().ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ua = a / na if na > 1e-8 else a
    ub = b / nb if nb > 1e-8 else b
    dot = float(np.clip((ua * ub).sum(), -1, 1))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    omega = math.acos(dot)
    return math.sin((1 - t) * omega) / math.sin(omega) * a + math.sin(t * omega) / math.sin(omega) * b


def ref_model_stock(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> np.ndarray:
    """θ_b + t·mean δ_i, t = N cos/(1 + (N−1) cos), cos the mean pairwise cosine of the δ_i."""
    b = base.double().numpy().ravel()
    deltas = [e.double().numpy().ravel() - b for e in experts]
    n = len(deltas)
    cosines = [float(np.clip(deltas[i] @ deltas[j] / max(np.linalg.norm(deltas[i]) * np.linalg.norm(deltas[j]),
                                                        1e-6), -1, 1))
               for i in range(n) for j in range(i + 1, n)]
    cos = sum(cosines) / len(cosines)
    t = n * cos / (1 + (n - 1) * cos)
    return b + t * np.mean(deltas, axis=0)


def ref_consensus(base: torch.Tensor, experts: Sequence[torch.Tensor], tall: Sequence[float],
                  w: Sequence[float], k: float, scale: float, normalize: bool) -> list[float]:
    """τ = Σ w_i δ_i; expert t votes for j if |w_t δ_tj| > λ_t |τ_j − w_t δ_tj|; τ_j stays with
    at least round(k) votes."""
    b = flat(base)
    deltas = deltas_of(base, experts)
    need = math.floor(k + 0.5)
    merged = []
    for j in range(len(b)):
        u = [wi * d[j] for wi, d in zip(w, deltas)]
        tau = sum(u)
        votes = sum(abs(ut) > lam * abs(tau - ut) for ut, lam in zip(u, tall))
        merged.append((tau if votes >= need else 0.0) / (sum(w) if normalize else 1.0))
    return finish(base, merged, scale)


def minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def ref_pcb(base: torch.Tensor, experts: Sequence[torch.Tensor], ratio: float, w: Sequence[float],
            scale: float, clip: float = 0.01) -> np.ndarray:
    """PCB per tensor (notes §1, pcb_ES form), float64 numpy, with sorts instead of selections."""
    b = base.double().numpy().ravel()
    n, d = len(experts), b.size
    clipped, signed = [], []
    for e in experts:
        delta = e.double().numpy().ravel() - b
        a = np.abs(delta)
        s = np.sort(a)
        lo, hi = int(d * clip), int(d * (1 - clip)) - 1
        if hi > lo:
            a = np.clip(a, s[lo], s[hi])
        clipped.append(np.sign(delta) * a)
        signed.append(np.sign(delta) * minmax(a))
    cut = int(d * (1 - ratio))
    num, den = np.zeros(d), np.zeros(d)
    if cut < d:
        for i in range(n):
            intra = np.exp(n * minmax(np.abs(clipped[i])) ** 2)
            inter = sum(np.tanh(signed[i] * signed[j]) for j in range(n))
            balance = intra * inter
            score = minmax(np.maximum(balance, np.sort(balance)[cut]))
            num += w[i] * score * clipped[i]
            den += score
    return b + scale * num / np.maximum(den, 1e-12)


# --- registry -----------------------------------------------------------------------------


def test_every_param_spec_is_a_proper_range() -> None:
    """Every ParamSpec of every operator and transform: low < high and low <= default <= high."""
    specs = [s for op in OPERATORS.values() for s in op.params] + [s for tr in TRANSFORMS.values() for s in tr.params]
    bad = [s.name for s in specs if not (s.low < s.high and s.low <= s.default <= s.high)]
    assert specs and not bad


def test_random_flag_marks_exactly_the_sampling_operators() -> None:
    assert {name for name, op in OPERATORS.items() if op.random} == set(RANDOM_OPS)


def test_check_experts_refuses_wrong_counts() -> None:
    """slerp takes exactly one expert, model_stock at least two."""
    with pytest.raises(ValueError):
        OPERATORS["slerp"].check_experts(2)
    with pytest.raises(ValueError):
        OPERATORS["model_stock"].check_experts(1)
    OPERATORS["slerp"].check_experts(1)
    OPERATORS["model_stock"].check_experts(2)


# --- linear family ------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_is_the_weighted_soup(normalize: bool) -> None:
    """Σ w_i θ_i (÷ Σ w_i when normalized); the base does not enter."""
    base, experts = models(0, n=3)
    w = (0.2, 0.6, 0.5)
    total = sum(w) if normalize else 1.0
    expected = [sum(wi * x[j] for wi, x in zip(w, map(flat, experts))) / total for j in range(base.numel())]
    close(call("linear", base, experts, weight=w, normalize=normalize), expected)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.4, 1.7])
def test_task_arithmetic_matches_direct(normalize: bool, scale: float) -> None:
    """θ_b + λ Σ w_i δ_i (÷ Σ w_i when normalized)."""
    base, experts = models(1, n=3)
    w = (1.0, 0.75, 0.3)
    deltas = deltas_of(base, experts)
    out = call("task_arithmetic", base, experts, weight=w, scale=scale, normalize=normalize)
    close(out, finish(base, ref_sum(deltas, w, normalize), scale))


# --- sparsified task vectors --------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("density", [(0.4, 0.6, 1.0), (0.01, 0.25, 0.99), (0.0, 0.5, 0.3)])
def test_ties_matches_direct(normalize: bool, density: tuple[float, ...]) -> None:
    """Top-k trim (k = max(1, ⌊d·n⌋)), elect sign of Σ w δ (0 → +), sum/mean of the agreeing."""
    base, experts = models(2, n=3)
    w, scale = (0.7, 0.5, 1.2), 1.3
    trimmed = [ref_top_k(d, k) for d, k in zip(deltas_of(base, experts), density)]
    out = call("ties", base, experts, density=density, weight=w, scale=scale, normalize=normalize)
    close(out, finish(base, ref_ties_merge(trimmed, w, normalize), scale))


@pytest.mark.parametrize("normalize", [False, True])
def test_ties_zero_sum_elects_plus(normalize: bool) -> None:
    """Where Σ w_i δ_i = 0 exactly the elected sign is +1: only the positive expert survives."""
    base = torch.zeros(3)
    experts = [torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-2.0, 1.0, 0.5])]
    out = call("ties", base, experts, density=(1.0, 1.0), weight=(0.5, 0.5), normalize=normalize)
    expected = [2.0, 1.0, 0.5] if normalize else [1.0, 0.5, 0.5]  # entry 2: both agree
    close(out, expected)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("density,gamma", [((0.5, 0.3), (0.1, 0.05)), ((0.8, 0.9), (0.2, 0.2)),
                                           ((0.02, 1.0), (0.0, 0.1)), ((0.3, 0.6), (0.01, 0.001))])
def test_breadcrumbs_matches_direct(name: str, normalize: bool, density: tuple[float, float],
                                    gamma: tuple[float, float]) -> None:
    """Keep ⌊d·n⌋ entries below the ⌊γ·n⌋ largest (fewer skipped if d + γ > 1), then TA or TIES."""
    base, experts = models(3, n=2, shape=(6, 9))
    w, scale = (0.9, 0.6), 0.8
    kept = [ref_breadcrumbs(d, k, g) for d, k, g in zip(deltas_of(base, experts), density, gamma)]
    merge = ref_ties_merge if name == "breadcrumbs_ties" else ref_sum
    out = call(name, base, experts, density=density, gamma=gamma, weight=w, scale=scale, normalize=normalize)
    close(out, finish(base, merge(kept, w, normalize), scale))


# --- random operators ---------------------------------------------------------------------


_M32 = (1 << 32) - 1


def lowbias32(x: int) -> int:
    """C. Wellons' lowbias32 integer hash, on Python ints."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def stream_words(g: torch.Generator, count: int) -> list[int]:
    """The documented draw rule: a key (odd mul, add) of two words from the recipe's generator,
    word j = lowbias32(j·mul + add)."""
    mul, add = (int(v) for v in torch.randint(0, 1 << 32, (2,), generator=g, dtype=torch.int64))
    return [lowbias32(j * (mul | 1) + add) for j in range(count)]


def reference_keeps(seed: int, delta_shape: tuple[int, ...], densities: Sequence[float],
                    probs: Sequence[np.ndarray] | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per expert, in expert order: (keep mask, keep probability) from the recipe's generator.
    DARE (``probs`` None): entry j's draw is half j % 2 (low half first) of word j // 2, read as a
    signed 16-bit value; kept iff below q − 2^15 with q = round(d·2^16), so p = q/2^16.
    DELLA: entry j's uniform is the top 24 bits of word j over 2^24; kept iff below p_j."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(delta_shape)
    out = []
    for i, d in enumerate(densities):
        if probs is None:
            words = stream_words(g, (n + 1) // 2)
            halves = [(words[j // 2] >> (16 * (j % 2))) & 0xFFFF for j in range(n)]
            signed = np.array([h - (1 << 16) if h >= 1 << 15 else h for h in halves])
            q = min(1 << 16, max(1, round(d * (1 << 16))))
            p = np.full(delta_shape, q / (1 << 16))
            out.append(((signed < q - (1 << 15)).reshape(delta_shape), p))
        else:
            u = np.array([(w >> 8) / (1 << 24) for w in stream_words(g, n)]).reshape(delta_shape)
            out.append((u < probs[i], probs[i]))
    return out


@pytest.mark.parametrize("name", RANDOM_OPS)
@pytest.mark.parametrize("normalize", [False, True])
def test_random_operator_matches_direct_given_the_draws(name: str, normalize: bool) -> None:
    """Entry j of expert i is kept iff its draw is below p_ij and rescaled by 1/p_ij (DARE: p = d
    on the 2^-16 grid; DELLA: rank-linear p). Pins the draws so stored recipes replay to the
    same model."""
    base, experts = models(4, n=3)
    density, eps, w, scale = (0.5, 0.3, 0.8), (0.1, 0.2, 0.15), (0.9, 0.4, 0.7), 1.2
    deltas = [e - base for e in experts]
    probs = ([ref_della_probs(delta, d, ep) for delta, d, ep in zip(deltas, density, eps)]
             if name.startswith("della") else None)
    dropped = []
    for delta, (keep, p) in zip(deltas, reference_keeps(11, tuple(base.shape), density, probs)):
        dropped.append(np.where(keep, delta.double().numpy() / np.where(keep, p, 1), 0.0).ravel().tolist())
    merge = ref_ties_merge if name in ("dare_ties", "della") else ref_sum
    kwargs = {"epsilon": eps} if name.startswith("della") else {}
    out = call(name, base, experts, seed=11, density=density, weight=w, scale=scale, normalize=normalize, **kwargs)
    close(out, finish(base, merge(dropped, w, normalize), scale))


@pytest.mark.parametrize("name", RANDOM_OPS)
def test_same_seed_is_bit_identical(name: str) -> None:
    base, experts = models(5, n=3, shape=(16, 32))
    a, b, c = (call(name, base, experts, seed=s) for s in (3, 3, 4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", RANDOM_OPS)
@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
def test_keep_rate_matches_density(name: str, density: float) -> None:
    """On 200k entries the kept fraction is within 4σ of d (DELLA's probabilities average to d)."""
    n = 200_000
    base = torch.zeros(n)
    expert = torch.randn(n, generator=torch.Generator().manual_seed(6))
    kwargs = {"epsilon": (0.08,)} if name.startswith("della") else {}
    out = call(name, base, [expert], density=(density,), weight=(1.0,), **kwargs)
    rate = float((out != 0).double().mean())
    assert abs(rate - density) < 4 * math.sqrt(density * (1 - density) / n)


def test_dare_is_unbiased() -> None:
    """The mean of DARE(δ) over many draws approaches δ (survivors rescaled by 1/d)."""
    draws, d = 3000, 0.3
    delta = torch.randn(64, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(8)
    zero = torch.zeros(64)
    op = OPERATORS["dare_linear"]
    mean = sum(op.fn(zero, [delta], density=(d,), weight=(1.0,), generator=g) for _ in range(draws)) / draws
    sigma = delta.abs() * math.sqrt((1 - d) / (d * draws))
    assert bool(((mean - delta).abs() <= 4 * sigma + 1e-6).all())


def della_runs(draws: int, d: float, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """δ of shape (8, 16) and, over ``draws`` DELLA draws, the keep frequency and mean per entry."""
    delta = torch.randn(8, 16, generator=torch.Generator().manual_seed(9))
    g, zero = torch.Generator().manual_seed(10), torch.zeros(8, 16)
    op = OPERATORS["della_linear"]
    kept, total = torch.zeros(8, 16, dtype=torch.float64), torch.zeros(8, 16, dtype=torch.float64)
    for _ in range(draws):
        out = op.fn(zero, [delta], density=(d,), epsilon=(eps,), weight=(1.0,), generator=g)
        kept += out != 0
        total += out
    return delta, kept / draws, total / draws


def test_della_keep_probability_is_linear_in_row_rank() -> None:
    """Per entry, the keep frequency matches d − ε + 2ε·rank/(c − 1) (rank within its row);
    averaged over rows it is a line from d − ε to d + ε."""
    draws, d, eps = 2000, 0.5, 0.3
    delta, freq, _ = della_runs(draws, d, eps)
    p = torch.from_numpy(ref_della_probs(delta, d, eps))
    assert bool(((freq - p).abs() <= 4 * (p * (1 - p) / draws).sqrt() + 1e-9).all())
    ranks = delta.abs().argsort(dim=1).argsort(dim=1).double()
    by_rank = [float(freq[ranks == r].mean()) for r in range(16)]
    slope, intercept = np.polyfit(np.arange(16) / 15, by_rank, 1)
    assert abs(intercept - (d - eps)) < 0.02 and abs(slope - 2 * eps) < 0.03


def test_della_is_unbiased() -> None:
    """The mean of DELLA(δ) over many draws approaches δ (survivors rescaled by 1/p)."""
    draws, d, eps = 2000, 0.5, 0.3
    delta, _, mean = della_runs(draws, d, eps)
    p = torch.from_numpy(ref_della_probs(delta, d, eps))
    sigma = delta.double().abs() * ((1 - p) / (p * draws)).sqrt()
    assert bool(((mean - delta.double()).abs() <= 4 * sigma + 1e-6).all())


# --- agreement masks ----------------------------------------------------------------------


@pytest.mark.parametrize("k", [0.0, 1.0, 1.6, 2.0, 3.0, 4.0])
@pytest.mark.parametrize("normalize", [False, True])
def test_consensus_matches_direct(k: float, normalize: bool) -> None:
    """TALL masks |w_t δ_t| > λ_t |τ − w_t δ_t|, entries with ≥ round(k) votes keep τ."""
    base, experts = models(12, n=3, shape=(6, 8))
    tall, w, scale = (0.2, 0.5, 0.9), (1.0, 0.8, 0.6), 0.7
    out = call("consensus", base, experts, tall=tall, weight=w, k=k, scale=scale, normalize=normalize)
    close(out, ref_consensus(base, experts, tall, w, k, scale, normalize))


def test_consensus_one_expert_is_task_arithmetic_up_to_k1() -> None:
    """n = 1: τ = δ and the mask is δ ≠ 0, so k ≤ 1 gives θ_b + λ w δ and k = 2 gives θ_b."""
    base, experts = models(13, n=1)
    expected = base + 0.5 * 0.8 * (experts[0] - base)
    close(call("consensus", base, experts, weight=(0.8,), k=1.0, scale=0.5), expected)
    close(call("consensus", base, experts, weight=(0.8,), k=2.0, scale=0.5), base)


@pytest.mark.parametrize("ratio", [0.02, 0.1, 0.3, 0.5])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_pcb_matches_reference(ratio: float, n: int) -> None:
    """Clip to the 1/99 % quantiles, intra exp(n·minmax²), inter Σ tanh, keep top ratio, weighted mean."""
    base, experts = models(14, n=n, shape=(10, 20))
    w, scale = (1.0, 0.7, 1.4)[:n], 1.3
    out = call("pcb", base, experts, ratio=ratio, weight=w, scale=scale)
    assert bool(torch.isfinite(out).all())
    close(out, ref_pcb(base, experts, ratio, w, scale))


def test_pcb_one_expert_full_ratio_is_the_clipped_delta() -> None:
    """n = 1, ratio ≈ 1: every entry above the bottom clip level gets λ·w·clip(δ); the rest stays base."""
    base, experts = models(15, n=1, shape=(10, 20))
    delta = (experts[0] - base).flatten().double()
    s = delta.abs().sort().values
    lo, hi = s[int(200 * 0.01)], s[int(200 * 0.99) - 1]
    clipped = delta.sign() * delta.abs().clamp(lo, hi)
    out = (call("pcb", base, experts, ratio=0.999, weight=(0.8,), scale=1.5) - base).flatten().double()
    above = delta.abs() > lo
    torch.testing.assert_close(out[above], 1.2 * clipped[above], rtol=1e-5, atol=1e-5)
    assert bool((out[~above] == 0).all())


def test_pcb_tiny_ratio_keeps_few_entries() -> None:
    """ratio 0.02 on 1000 entries changes at most 2% of them per expert, and all outputs are finite."""
    base, experts = models(16, n=2, shape=(25, 40))
    out = call("pcb", base, experts, ratio=0.02, weight=(1.0, 1.0))
    assert bool(torch.isfinite(out).all())
    changed = int((out != base).sum())
    assert 0 < changed <= 2 * 20


# --- geometry -----------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_mergekit_formula(t: float) -> None:
    base, experts = models(17, n=1)
    close(call("slerp", base, experts, t=t), ref_slerp(base, experts[0], t))


def test_slerp_endpoints_are_exact() -> None:
    """t = 0 gives the base, t = 1 the expert (bit for bit)."""
    base, experts = models(18, n=1)
    assert torch.equal(call("slerp", base, experts, t=0.0), base)
    assert torch.equal(call("slerp", base, experts, t=1.0), experts[0])


@pytest.mark.parametrize("factor", [1.0001, -2.0])
def test_slerp_near_parallel_falls_back_to_lerp(factor: float) -> None:
    """|cos Ω| > 0.9995 (parallel or anti-parallel) interpolates linearly."""
    base, _ = models(19, n=0)
    expert = base * factor + 1e-4 * models(20, n=0)[0]
    out = call("slerp", base, [expert], t=0.3)
    close(out, 0.7 * base + 0.3 * expert)
    close(out, ref_slerp(base, expert, 0.3))


def test_slerp_zero_base_uses_right_angle() -> None:
    """A zero tensor is left unnormalised: cos Ω = 0, weights sin((1−t)π/2), sin(tπ/2)."""
    base, experts = torch.zeros(4, 6), models(21, n=0)[:1]
    close(call("slerp", base, experts, t=0.3), math.sin(0.3 * math.pi / 2) * experts[0])


def test_model_stock_matches_formula() -> None:
    """Correlated task vectors (cos > 0): θ_b + t·mean δ_i with t = N cos/(1 + (N−1) cos)."""
    g = torch.Generator().manual_seed(22)
    base, common = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    experts = [base + common + 0.8 * torch.randn(5, 7, generator=g) for _ in range(3)]
    close(call("model_stock", base, experts), ref_model_stock(base, experts))


def test_model_stock_identical_experts_give_their_mean() -> None:
    """cos = 1 gives t = 1: the experts' mean (here each expert)."""
    base, experts = models(23, n=1)
    close(call("model_stock", base, [experts[0]] * 3), experts[0])


def test_model_stock_orthogonal_deltas_give_base() -> None:
    """cos = 0 gives t = 0."""
    base = torch.randn(2, 4, generator=torch.Generator().manual_seed(24))
    d1, d2 = torch.zeros(2, 4), torch.zeros(2, 4)
    d1[0, :2], d2[1, 2:] = 1.5, -0.7
    close(call("model_stock", base, [base + d1, base + d2]), base)


def test_model_stock_stays_bounded_for_opposed_experts() -> None:
    """Nearly opposed task vectors must not push the merge far beyond the experts."""
    g = torch.Generator().manual_seed(25)
    base, d1 = torch.zeros(1000), torch.randn(1000, generator=g)
    d2 = -1.9 * d1 + 0.02 * torch.randn(1000, generator=g)
    out = call("model_stock", base, [base + d1, base + d2])
    assert float(out.norm()) <= float(torch.stack([d1, d2]).norm(dim=1).max())


@pytest.mark.parametrize("select,winner", [((0.3, 0.4), None), ((0.6, 0.9), 1), ((0.7, 0.2), 0),
                                           ((0.5, 0.5), None), ((0.51, 0.5), 0)])
def test_swap_picks_highest_select_above_half(select: tuple[float, float], winner: int | None) -> None:
    base, experts = models(26, n=2)
    out = call("swap", base, experts, select=select)
    assert torch.equal(out, base if winner is None else experts[winner])


# --- LiNeS --------------------------------------------------------------------------------


@pytest.mark.parametrize("name,layers", [("model.layers.0.mlp.up_proj.weight", 8),
                                         ("model.layers.3.self_attn.q_proj.weight", 8),
                                         ("model.layers.7.input_layernorm.weight", 8),
                                         ("model.embed_tokens.weight", 8), ("lm_head.weight", 8),
                                         ("model.norm.weight", 8), ("model.layers.5.mlp.down_proj.weight", 6)])
def test_lines_scales_task_vector_by_depth(name: str, layers: int) -> None:
    """θ_b + (α + β·depth)·(merged − θ_b), depth = ℓ/(L−1) in layers and 0 outside them."""
    base, (merged,) = models(27, n=1)
    depth = depth_fraction(name, layers)
    match = [int(p) for p in name.split(".") if p.isdigit()]
    assert depth == (match[0] / (layers - 1) if match else 0.0)
    alpha, beta = 0.3, 0.6
    expected = base + (alpha + beta * depth) * (merged - base)
    close(TRANSFORMS["lines"].fn(merged.clone(), base, depth, alpha=alpha, beta=beta), expected)


def test_lines_leaves_base_alone() -> None:
    base, (merged,) = models(28, n=1)
    before = base.clone()
    TRANSFORMS["lines"].fn(merged.clone(), base, 0.5, alpha=0.2, beta=0.7)
    assert torch.equal(base, before)


# --- invariants ---------------------------------------------------------------------------


def trim_mask(x: torch.Tensor, trim: sparsify.Trim) -> torch.Tensor:
    """The entries a trim keeps, from the cuts the merges use (fused.trim_cuts: the native selection
    from 64 entries, the device selection below): above the keep cut and not above the drop cut, an
    entry equal to a cut above it iff its index is before the cut's tie split."""
    if trim.keep < 0:
        return torch.zeros(x.numel(), dtype=torch.bool)
    bits, index = x.abs().view(torch.int32), torch.arange(x.numel())
    rows = iter(fused.trim_cuts([x], None, sparsify.cut_wants([trim])).tolist())

    def above(cut: list[int]) -> torch.Tensor:
        return (bits > cut[0]) | ((bits == cut[0]) & (index < cut[1]))
    mask = above(next(rows)) if trim.keep > 0 else torch.ones(x.numel(), dtype=torch.bool)
    return mask & ~above(next(rows)) if trim.drop > 0 else mask


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    return trim_mask(x, sparsify.ties_trims([density], x.numel())[0])


def breadcrumbs_mask(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    return trim_mask(x, sparsify.breadcrumbs_trims([density], [gamma], x.numel())[0])


@FAST
@given(st.lists(st.floats(-4, 4, width=32), min_size=1, max_size=60), st.floats(0.0, 1.0))
def test_magnitude_mask_keeps_exactly_the_largest(values: list[float], density: float) -> None:
    """Exactly keep_count(d, n) = max(1, ⌊d·n⌋) entries, none smaller than a dropped one."""
    x = torch.tensor(values)
    k = ref_keep_count(density, x.numel())
    assert sparsify.keep_count(density, x.numel()) == k
    mask = magnitude_mask(x, density)
    assert int(mask.sum()) == k
    if 0 < k < x.numel():
        assert float(x.abs()[mask].min()) >= float(x.abs()[~mask].max())


@FAST
@given(st.integers(0, 10_000), st.integers(1, 300), st.floats(0.0, 0.99), st.floats(0.0, 0.5))
def test_breadcrumbs_mask_keeps_the_band(seed: int, n: int, density: float, gamma: float) -> None:
    """⌊d·n⌋ entries, all below the skipped outliers and above the dropped small ones."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    mask = breadcrumbs_mask(x, density, gamma)
    assert int(mask.sum()) == math.floor(density * n)
    expected = [v != 0 for v in ref_breadcrumbs(flat(x), density, gamma)]
    assert mask.tolist() == expected


def test_breadcrumbs_mask_count_with_tied_magnitudes() -> None:
    """Tied magnitudes (common in bf16 deltas) must still keep exactly ⌊d·n⌋ entries."""
    assert int(breadcrumbs_mask(torch.ones(100), 0.1, 0.01).sum()) == 10


@FAST
@given(st.integers(0, 10_000), st.integers(1, 3), st.booleans(), st.sampled_from(TASK_VECTOR_OPS))
def test_zero_weights_give_base(seed: int, n: int, normalize: bool, name: str) -> None:
    """Every task-vector operator with all weights 0 returns the base."""
    base, experts = models(seed, n=n)
    out = call(name, base, experts, normalize=normalize, seed=seed, weight=(0.0,) * n)
    close(out, base)


@FAST
@given(st.integers(0, 10_000), st.integers(1, 3), st.booleans(), st.sampled_from(sorted(OPERATORS)),
       st.lists(st.floats(0.05, 1.0), min_size=3, max_size=3))
def test_experts_equal_to_base_give_base(seed: int, n: int, normalize: bool, name: str, w: list[float]) -> None:
    """No task vector, nothing to merge: the base (linear: Σ w θ / Σ w, or Σ w θ unnormalized)."""
    n = valid_experts(name, n)
    base, _ = models(seed, n=0)
    overrides = {"weight": tuple(w[:n])} if "weight" in OPERATORS[name].param_names else {}
    out = call(name, base, [base.clone() for _ in range(n)], normalize=normalize, seed=seed, **overrides)
    factor = 1.0 if name != "linear" or normalize else sum(w[:n])
    close(out, factor * base)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_out_argument_is_written_and_equal(name: str) -> None:
    """With ``out=`` the result lands in that tensor and equals the result without it."""
    base, experts = models(29, n=valid_experts(name, 3))
    expected = call(name, base, experts, seed=5)
    buffer = torch.full_like(base, float("nan"))
    result = call(name, base, experts, seed=5, out=buffer)
    assert result.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer, expected)


@pytest.mark.parametrize("name", sorted(OPERATORS))
@pytest.mark.parametrize("normalize", [False, True])
def test_inputs_are_never_modified(name: str, normalize: bool) -> None:
    base, experts = models(30, n=valid_experts(name, 3))
    before = [base.clone(), *(e.clone() for e in experts)]
    call(name, base, experts, normalize=normalize)
    call(name, base, experts, normalize=normalize, out=torch.empty_like(base))
    assert all(torch.equal(a, b) for a, b in zip(before, [base, *experts]))
