"""Native magnitude selection: the cut above which exactly k entries of |δ| lie, δ = θ_i − θ_b.

TIES and Breadcrumbs keep the top ⌊d·n⌋ of |δ| per expert, so every expert is read in full
before its first merged entry is known. On the CPU (``workers/kernels/band_scan.cpp``, float32/bfloat16)
a sample of the tensor brackets each k-th magnitude in a narrow band [lo, hi]; one pass over all
experts at once counts the entries above each band and collects the few inside it, and the k-th is
selected among those (Floyd & Rivest's sampling selection, CACM 1975, in one pass). A band that
misses its k-th entry (the sample misled: rare, detected exactly, never wrong) is retried wider;
where a cut is missed twice, and for tensors the kernel does not take (a GPU, float16, no compiler),
every cut of the tensor is selected by :func:`workers.fused.device_cuts`, which gives the same cuts.

For 16-bit sources δ is formed in float32 from the exactly widened values (merge arithmetic 2),
so the cuts are float32 magnitude bits whatever the sources' dtype.

Magnitudes are compared as bit patterns: a non-negative float's bits order like its value.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from evomerge.workers.kernels import native


@dataclass(frozen=True)
class Cut:
    """The k largest |δ| of a tensor, as bit patterns of the magnitudes: entry j is above the
    cut iff bits_j > ``value``, or bits_j = ``value`` and j < ``until`` (ties at the cut are
    taken in index order; None takes them all). The bit pattern of a non-negative float
    orders like its value, so the test is an integer compare."""

    value: int
    until: int | None = None


# --- the native sampling path --------------------------------------------------------

NATIVE_MIN = 64  # entries: a sample's blocks need as many (smaller tensors: fused.device_cuts)
# band half-widths in binomial standard deviations of the sample rank: the first misses the k-th
# entry in ~5e-4 of cuts with independent entries, the second (only for those) practically never
WIDTHS = (3.5, 12.0)
MAX_SLOTS = 32  # cuts one native call takes (magnitude.h's kMaxSlots)


_ARGS = (ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int64,
         ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.c_int64, ctypes.c_double,
         ctypes.c_int, ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int))


def kernel() -> Callable[..., int] | None:
    """The native selection, or None (no compiler, or turned off)."""
    return native.kernel("band_scan", "evomerge_select", _ARGS)


def sample_size(n: int) -> int:
    """Entries sampled to bracket a cut. A bracket of s samples holds ~n/√s entries to collect and
    select among, and costs ~s to draw and rank: (7n)^(2/3) balances the two (measured costs per
    entry), between 4096 and 2^18."""
    return min(n, max(4096, min(1 << 18, round((7 * n) ** (2 / 3)))))


def _native_cuts(select: Callable[..., int], experts: Sequence[Tensor], base: Tensor | None,
                 wants: Sequence[tuple[int, int]], width: float) -> list[Cut | None]:
    """The cuts of ``wants`` by one native pass, each bracketed by a sample of the tensor ``width``
    binomial deviations wide; None where that band missed the k-th entry."""
    n, slots = experts[0].numel(), len(wants)
    sample = sample_size(n)
    value, until, ok = (ctypes.c_uint32 * slots)(), (ctypes.c_int64 * slots)(), (ctypes.c_int * slots)()
    status = select(
        native.DTYPES[experts[0].dtype], base.data_ptr() if base is not None else None,
        native.pointers(experts), len(experts), n,
        (ctypes.c_int * slots)(*[i for i, _ in wants]), (ctypes.c_int64 * slots)(*[k for _, k in wants]), slots,
        sample, width, native.threads(), value, until, ok)
    if status != 0:
        raise ValueError(f"native selection rejected its arguments (n={n}, {slots} cuts)")
    return [(Cut(value[s]) if until[s] < 0 else Cut(value[s], until[s])) if ok[s] else None for s in range(slots)]


def native_cuts(experts: Sequence[Tensor], base: Tensor | None,
                wants: Sequence[tuple[int, int]]) -> list[Cut | None] | None:
    """For each (expert index, k) with 0 < k < n: the cut above which exactly k entries of
    |δ_expert| lie (δ = expert − ``base``; the expert itself when None), ties at the cut to the
    lowest indices, all experts in one native pass. None where the kernel cannot take these tensors
    (no compiler, turned off, not float32/bfloat16 on the CPU, under NATIVE_MIN entries); a None in
    the list where both bands missed that cut (the caller selects it another way)."""
    select = kernel()
    if not wants or select is None or not native.takes([*experts, *([base] if base is not None else [])],
                                                        min_numel=NATIVE_MIN, max_numel=1 << 31):
        return None
    cuts: list[Cut | None] = [None] * len(wants)
    for width in WIDTHS:  # a wider band for the cuts the first one missed
        todo = [w for w, c in enumerate(cuts) if c is None]
        for at in range(0, len(todo), MAX_SLOTS):  # Breadcrumbs over 16 experts asks for more
            batch = todo[at:at + MAX_SLOTS]
            for w, cut in zip(batch, _native_cuts(select, experts, base, [wants[w] for w in batch], width)):
                cuts[w] = cut
    return cuts


# --- whole tensors on a GPU ------------------------------------------------------------

NO_SPLIT = (1 << 31) - 1  # a tie split no index reaches: every tie is above the cut
