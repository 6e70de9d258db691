"""Sparsification of task vectors: which entries of δ = θ − θ_b an operator keeps.

Each function works on one tensor and returns a new one (or a boolean mask); none
touches its input. Counts follow mergekit's convention (k = ⌊d·n⌋, at least one entry
when d > 0) so deterministic operators agree with mergekit bit for bit; the random ones
rescale survivors by the inverse keep probability as in the papers (mergekit instead
rescales the whole tensor to its former L1 norm: same expectation in aggregate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.profiler import record_function


def keep_count(density: float, n: int) -> int:
    """Entries kept at ``density``: ⌊d·n⌋, at least 1 when 0 < d < 1 (mergekit's rule)."""
    if density >= 1.0:
        return n
    if density <= 0.0 or n == 0:
        return 0
    return max(1, int(density * n))


@dataclass(frozen=True)
class Trim:
    """One expert's magnitude trim: keep its ``keep`` largest |δ| (0: no such cut, −1: keep
    nothing) and drop its ``drop`` largest among them (0: none). Keep all: Trim(0)."""

    keep: int
    drop: int = 0


def ties_trims(density: Sequence[float], n: int) -> list[Trim]:
    """TIES trim (Yadav et al. 2023, §3) of each expert: its top ⌊d_i·n⌋ magnitudes."""
    counts = [keep_count(d, n) for d in density]
    return [Trim(0) if k >= n else Trim(-1) if k == 0 else Trim(k) for k in counts]


def breadcrumbs_trims(density: Sequence[float], gamma: Sequence[float], n: int) -> list[Trim]:
    """Model Breadcrumbs (Davari & Belilovsky 2024) of each expert: drop the top-γ outliers of
    |δ| and the smallest entries, keeping ⌊d·n⌋ entries in the band between (mergekit's
    parametrisation: the paper's bottom fraction β is 1 − d − γ). When d + γ > 1 fewer outliers
    are dropped."""
    trims = []
    for d, g in zip(density, gamma):
        kept = int(d * n)
        top = min(int(g * n), n - kept)
        trims.append(Trim(0) if d >= 1.0 else Trim(-1) if kept == 0 else Trim(kept + top if kept + top < n else 0, top))
    return trims


def cut_wants(trims: Sequence[Trim]) -> list[tuple[int, int]]:
    """The (expert, k) cuts the trims need, in order: per expert its keep cut, then its drop cut."""
    return [(i, k) for i, t in enumerate(trims) if t.keep >= 0 for k in (t.keep, t.drop) if k > 0]


_WORD = 1 << 32
MIX = (0x7FEB352D, 0x846CA68B)  # lowbias32's multipliers (C. Wellons, "hash prospector")


def signed32(value: int) -> int:
    """``value`` mod 2^32 as a signed 32-bit integer (torch's int32 ops wrap)."""
    value %= _WORD
    return value - _WORD if value >= _WORD // 2 else value


def _const(value: int, like: Tensor) -> Tensor:
    return torch.tensor(signed32(value), dtype=torch.int32, device=like.device)


def _xorshift_right(x: Tensor, shift: int, spare: Tensor) -> None:
    """x ^= x >>> shift (a logical shift: torch shifts int32 arithmetically, so mask it)."""
    torch.bitwise_right_shift(x, shift, out=spare)
    spare.bitwise_and_(_const((1 << (32 - shift)) - 1, x))
    x.bitwise_xor_(spare)


@dataclass(frozen=True)
class Stream:
    """A counter-based stream of random 32-bit words: word j is lowbias32(j·mul + add) mod 2^32.

    Any word is computed from its index alone, so a tensor's draws are the same whatever the
    chunking or the number of threads, and chunks can be drawn in any order. The key (odd
    ``mul``, ``add``) comes from the recipe's per-tensor generator, one draw per expert, so a
    replay is bit-identical and different experts, tensors and seeds draw unrelated masks.
    lowbias32 is an invertible integer hash, so the words of one stream are distinct.
    """

    mul: int
    add: int

    @classmethod
    def draw(cls, generator: torch.Generator | None) -> Stream:
        with record_function("evomerge.host"):  # the key: two integers from the host's generator
            mul, add = (int(v) for v in torch.randint(0, _WORD, (2,), generator=generator, dtype=torch.int64))
        return cls(mul | 1, add)

    def words(self, first: int, out: Tensor, spare: Tensor, index: Tensor) -> Tensor:
        """Words first .. first + len(out) − 1 into ``out`` (int32; ``spare`` the same size,
        ``index`` = arange of the same size)."""
        torch.mul(index, _const(self.mul, out), out=out)
        out.add_(_const(first * self.mul + self.add, out))
        _xorshift_right(out, 16, spare)
        out.mul_(_const(MIX[0], out))
        _xorshift_right(out, 15, spare)
        out.mul_(_const(MIX[1], out))
        _xorshift_right(out, 16, spare)
        return out

    def uniform(self, shape: torch.Size, device: torch.device) -> Tensor:
        """Float32 uniforms in [0, 1) on the 2^-24 grid (torch.rand's), one word per entry."""
        n = math.prod(shape)
        words = torch.empty(n, dtype=torch.int32, device=device)
        self.words(0, words, torch.empty_like(words), torch.arange(n, dtype=torch.int32, device=device))
        top = torch.bitwise_right_shift(words, 8).bitwise_and_(_const((1 << 24) - 1, words))
        return top.to(torch.float32).mul_(2.0 ** -24).view(shape)


_HALF_WORD = 1 << 16


@dataclass(frozen=True)
class DareDraw:
    """One expert's DARE drop for one tensor: entry j is kept iff its 16-bit draw (half j % 2
    of word j // 2 of ``stream``, as a signed value) is below ``threshold``; the keep
    probability is the density rounded to a multiple of 2^-16, and survivors are rescaled by
    its exact inverse, so the result stays unbiased."""

    stream: Stream
    threshold: int
    probability: float

    @classmethod
    def draw(cls, density: float, generator: torch.Generator | None) -> DareDraw:
        stream = Stream.draw(generator)
        if density >= 1.0:
            return cls(stream, _HALF_WORD // 2, 1.0)
        if density <= 0.0:
            return cls(stream, -_HALF_WORD // 2, 0.0)
        q = min(_HALF_WORD, max(1, round(density * _HALF_WORD)))
        return cls(stream, q - _HALF_WORD // 2, q / _HALF_WORD)

    @property
    def keep_all(self) -> bool:
        return self.probability >= 1.0

    def mask_bits(self, start: int, bits: Tensor, words: Tensor, spare: Tensor, index: Tensor) -> Tensor:
        """Into ``bits`` (int32, one per entry from entry ``start``, even): −1 where kept, 0 where
        dropped. ``words``, ``spare``, ``index``: scratch of at least half as many entries."""
        if start % 2:
            raise ValueError("DARE chunks start at an even entry")
        n = bits.numel()
        count = (n + 1) // 2
        drawn = self.stream.words(start // 2, words[:count], spare[:count], index[:count])
        bits.copy_(drawn.view(torch.int16)[:n])  # sign-extended 16-bit draws
        bits.sub_(_const(self.threshold, bits))  # |difference| < 2^16: no overflow
        return bits.bitwise_right_shift_(31)

    def keep_mask(self, shape: torch.Size, device: torch.device) -> Tensor:
        """The boolean keep mask of a whole tensor (for tests and whole-tensor use)."""
        n = math.prod(shape)
        words = (n + 1) // 2
        bits = torch.empty(n, dtype=torch.int32, device=device)
        index = torch.arange(words, dtype=torch.int32, device=device)
        self.mask_bits(0, bits, torch.empty(words, dtype=torch.int32, device=device),
                       torch.empty(words, dtype=torch.int32, device=device), index)
        return (bits != 0).view(shape)


def dare(delta: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE (Yu et al. 2024, eq. 2) of a whole tensor: drop each entry with probability 1 − d,
    rescale the survivors by 1/d so the expectation is δ (the operators stream it instead)."""
    draw = DareDraw.draw(density, generator)
    if draw.keep_all:
        return delta.clone()
    if draw.probability <= 0.0:
        return torch.zeros_like(delta)
    return (delta * draw.keep_mask(delta.shape, delta.device)).mul_(1.0 / draw.probability)


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
    keep = Stream.draw(generator).uniform(delta.shape, delta.device) < probs  # never where p = 0, so dividing by the clamped p is safe
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
