"""TIES/Breadcrumbs cuts selected on the tensors' device in one graph, and the merge kernel's keys.

Every cut of a tensor (each expert's keep cut, Breadcrumbs' drop cuts too) is found by one
``kthvalue`` over a [cuts, n + depth] int32 tensor: row c holds the bits of |δ| of its expert
(non-negative floats' bits order like their values), negated where that makes its rank smaller,
then ``depth`` pads. ``kthvalue`` takes one rank for all rows, so row c is given ``rank − q_c``
pads below every entry (its wanted rank is q_c; the rest of its pads lie above every entry): the
``rank``-th smallest of the padded row is then the q_c-th of its bits. The counts above each cut,
the tie split (ties go to the lowest indices: a cumulative sum of the ties, as
:func:`workers.selection.native_cuts`) and the kernel's key rows follow in the same graph; the host
builds one small int32 table (ranks, pads, the keys' constants and where each key comes from),
moved to the device in one copy, and never waits for the device.

A few kernels beside the selection (one graph per expert count, cut layout and dtype). Memory:
the padded rows, 4 bytes a row entry, kept to the end (the counts read them rather than the sources:
the CPU backend would copy each row's source otherwise), rows as long as the cuts' ranks differ (n + 2
for TIES of equal densities, at most ~1.5·n: each rank is taken from the nearer end); the CPU's
``kthvalue`` adds its own copy and int64 indices (12 bytes a row entry, its peak); then the ties'
mask and running counts (4–8 bytes an entry and cut).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.workers.kernels.selection import NO_SPLIT
from evomerge.workers.kernels.sparsify import Trim

# Bytes per entry and cut while a graph runs: the padded row (int32, at most ~1.5 entries per
# entry), the rows' bits again (int32), the ties' mask (1) and running count (int32). An upper
# bound: inductor may fuse the last three; not measured on a GPU yet (benchmarks/gpu_check.py).
CUT_ROW_BYTES = 4 * 3 // 2 + 4 + 1 + 4
CUT_SCRATCH = 4 << 30  # bytes: a tensor's cuts are selected in groups of rows that stay within it


def group_size(cuts: int, n: int, scratch: int = CUT_SCRATCH) -> int:
    """Cuts per graph for ``cuts`` cuts of n-entry tensors: all, unless their rows would hold more
    than ``scratch`` bytes (a 70 B model's embedding: one cut at a time)."""
    return max(1, min(cuts, scratch // (CUT_ROW_BYTES * n)))


_BELOW, _ABOVE = -(1 << 31), (1 << 31) - 1  # pads: int32 bits of |δ| and their negations lie strictly between
CONSTS = [0, NO_SPLIT]  # the first constants of every table (none would be a graph of its own)


def plan(wants: Sequence[tuple[int, int]], n: int) -> tuple[tuple[int, ...], int, int, list[int]]:
    """For the cuts ``wants`` ((expert, k), 0 < k < n) of n-entry tensors: each cut's expert, the
    common rank, the pad depth, and the table's head (each cut's k, its pads below, whether its
    row is negated). The k-th largest is the (n − k + 1)-th smallest, or the k-th smallest of the
    negated bits: the smaller of the two keeps the ranks, hence the pads, close together."""
    ranks = [min(k, n - k + 1) for _, k in wants]
    rank = max(ranks)
    lows = [rank - q for q in ranks]
    flips = [int(k < n - k + 1) for _, k in wants]
    # at least 2 pads: a depth of 0 or 1 would be a graph of its own (torch.compile specializes both)
    return tuple(e for e, _ in wants), rank, max(2, *lows), [*(k for _, k in wants), *lows, *flips]


def select(base: Tensor | None, experts: list[Tensor], rows: tuple[int, ...], rank: int, depth: int, table: Tensor,
           out: Tensor) -> None:
    """Into ``out`` (int32, as long as the table's tail): entries of the cuts' rows (value, until), flat,
    followed by the table's constants, picked by the table's tail (indices into that). The cuts are
    :func:`workers.selection.native_cuts`' (δ = expert − ``base`` in float32, the expert when None;
    ``rows``, ``rank``, ``depth`` and the table's head from :func:`plan`); no read back."""
    cuts = len(rows)
    k, lows, flip = table[:cuts], table[cuts:2 * cuts], table[2 * cuts:3 * cuts] != 0
    consts, index = table[3 * cuts:table.numel() - out.numel()], table[table.numel() - out.numel():]
    widened = base.float() if base is not None else None
    bits = [(e.float() - widened if widened is not None else e.float()).abs().view(torch.int32) for e in experts]
    at = torch.arange(depth, dtype=torch.int32, device=table.device)
    pieces = []  # one flat cat, which every backend writes straight into its slices of the padded rows
    for c, e in enumerate(rows):
        pieces += [torch.where(flip[c], -bits[e], bits[e]), torch.where(at < lows[c], _BELOW, _ABOVE).to(torch.int32)]
    padded = torch.cat(pieces).view(cuts, -1)
    picked = torch.kthvalue(padded, rank, dim=1).values
    value = torch.where(flip, -picked, picked)[:, None]
    x = torch.where(flip[:, None], -padded[:, :bits[0].numel()], padded[:, :bits[0].numel()])  # the rows' bits again
    need = k - (x > value).sum(1, dtype=torch.int32)  # of the entries equal to it, the first `need` are above
    ties = (x == value).to(torch.int32).cumsum(1, dtype=torch.int32)
    split = (ties < need[:, None]).sum(1, dtype=torch.int32) + 1  # after the need-th tie
    until = torch.where(need == ties[:, -1], NO_SPLIT, split)
    source = torch.cat([torch.cat([value, until[:, None]], dim=1).reshape(-1), consts])
    out.copy_(source[index])


def keys_table(trims: Sequence[Trim], weight: Sequence[float], factors: Sequence[float],
               scale: float) -> tuple[list[int], list[int], tuple[bool, ...]]:
    """The merge kernel's ``keys`` (a row per expert: low cut's value and until, high cut's) and
    ``reals`` (a row per expert: factor, weight, the two cuts' bits as floats; last: λ, 0, 0, 0) as
    one int32 block of 2E + 1 rows of 4 (the reals as float32 bits): the constants (0, NO_SPLIT,
    then the factors', weights' and λ's float32 bits) and, per entry of the block, its index into
    [the cuts (value, until) of :func:`workers.sparsify.cut_wants` order, flat; the constants].
    Also each expert's ``highs`` (whether it has a high cut)."""
    count, cuts = len(trims), 2 * sum((t.keep > 0) + (t.keep >= 0 and t.drop > 0) for t in trims)
    floats = torch.tensor([*factors, *weight, scale], dtype=torch.float32)  # Python floats rounded as eager rounds them
    consts = [*CONSTS, *floats.view(torch.int32).tolist()]
    zero, none, factor, weighted, lam = cuts, cuts + 1, cuts + 2, cuts + 2 + count, cuts + 2 + 2 * count
    keys, reals, slot = [], [], 0
    for i, t in enumerate(trims):
        low = high = (zero, none)
        if t.keep > 0:
            low, slot = (2 * slot, 2 * slot + 1), slot + 1
        if t.keep >= 0 and t.drop > 0:
            high, slot = (2 * slot, 2 * slot + 1), slot + 1
        keys += [*low, *high]  # keeps nothing (keep < 0): below a high cut of 0
        reals += [factor + i, weighted + i, low[0], high[0]]
    return consts, [*keys, *reals, lam, zero, zero, zero], tuple(t.keep < 0 or t.drop > 0 for t in trims)
