"""Exact magnitude selection: the cut above which exactly k entries of |δ| lie, δ = θ_i − θ_b.

TIES and Breadcrumbs keep the top ⌊d·n⌋ of |δ| per expert, so every expert is read in full
before its first merged entry is known. Two exact paths, equal in every bit of their result:

- native (``workers/band_scan.cpp``, CPU float32/bfloat16): a sample of the tensor brackets
  each k-th magnitude in a narrow band [lo, hi]; one pass over all experts at once counts the
  entries above each band and collects the few inside it, and the k-th is selected among those
  (Floyd & Rivest's sampling selection, CACM 1975, in one pass). A band that misses its k-th
  entry (the sample misled: rare, detected exactly, never wrong) is retried wider, then that cut
  takes the radix path.
- radix (torch ops, any device and dtype): a histogram of the top 15 bits of the magnitudes'
  bit patterns, then one of the low 16 bits of the bin holding the cut.

For 16-bit sources δ is formed in float32 from the exactly widened values (merge arithmetic 2),
so the cuts are float32 magnitude bits whatever the sources' dtype.

Magnitudes are compared as bit patterns: a non-negative float's bits order like its value.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from evomerge.workers import native
from evomerge.workers.precision import working_dtype


@dataclass(frozen=True)
class Cut:
    """The k largest |δ| of a tensor, as bit patterns of the magnitudes: entry j is above the
    cut iff bits_j > ``value``, or bits_j = ``value`` and j < ``until`` (ties at the cut are
    taken in index order; None takes them all). The bit pattern of a non-negative float
    orders like its value, so the test is an integer compare against ``threshold(j)``."""

    value: int
    until: int | None = None

    def threshold(self, index: int) -> int:
        return self.value if self.until is None or index < self.until else self.value + 1


_INTS = {4: torch.int32, 2: torch.int16}


def abs_bits(delta: Tensor, out: Tensor | None = None) -> Tensor:
    """|δ| as non-negative integers ordered like the magnitudes (int32 for any float dtype),
    flat; written into ``out`` (int32, δ's size) when given."""
    ints = _INTS[delta.element_size()]
    top = (1 << (8 * delta.element_size() - 1)) - 1
    bits = delta.reshape(-1).view(ints)
    if out is None:
        return torch.bitwise_and(bits, top).to(torch.int32)
    if ints == torch.int32:
        return torch.bitwise_and(bits, top, out=out)
    return out.copy_(torch.bitwise_and(bits, top))


SELECT_CHUNK = 1 << 20  # entries per step of a selection pass (4 MB of int32: inside L3)


class _Magnitudes:
    """The bit patterns of |δ| (int32), δ = ``expert`` − ``base`` (``expert`` itself when ``base``
    is None), produced chunk by chunk into reused buffers: a selection reads them in a few
    passes without a temporary of the tensor's size (each page-faulted anew: ~2 ns/entry).
    The histogram of the top 15 bits is computed once and shared by every cut."""

    def __init__(self, expert: Tensor, base: Tensor | None) -> None:
        self._expert = expert.reshape(-1)
        self._base = base.reshape(-1) if base is not None else None
        self.n = self._expert.numel()
        size = max(1, min(SELECT_CHUNK if expert.device.type == "cpu" else 1 << 28, self.n))
        dtype = working_dtype(expert.dtype)
        self._wide = dtype != expert.dtype  # 16-bit: magnitudes of the float32 δ
        self._size, self._delta = size, torch.empty(size, dtype=dtype, device=expert.device)
        self._bits = torch.empty(size, dtype=torch.int32, device=expert.device)
        self._spare = torch.empty(size, dtype=torch.int32, device=expert.device)
        self._hist: Tensor | None = None

    def chunks(self) -> Iterator[tuple[int, Tensor]]:
        """(first entry, bits of the chunk); the buffer is overwritten by the next chunk."""
        for start in range(0, self.n, self._size):
            piece = self._expert[start:start + self._size]
            m = piece.numel()
            if self._wide:  # 16-bit: δ formed in float32 from the exactly widened sources
                piece = self._delta[:m].copy_(piece)
                if self._base is not None:
                    piece.sub_(self._base[start:start + m])
            elif self._base is not None:
                piece = torch.sub(piece, self._base[start:start + m], out=self._delta[:m])
            yield start, abs_bits(piece, out=self._bits[:m])

    def top_histogram(self) -> Tensor:
        """Counts of the top 15 bits (bits >> 16) over the tensor."""
        if self._hist is None:
            hist = torch.zeros(1 << 15, dtype=torch.int64, device=self._bits.device)
            for _, bits in self.chunks():
                high = torch.bitwise_right_shift(bits, 16, out=self._spare[:bits.numel()])
                hist += torch.bincount(high, minlength=1 << 15)
            self._hist = hist
        return self._hist

    def low_histogram(self, top: int) -> Tensor:
        """Counts of the low 16 bits over the entries whose top bits equal ``top``."""
        hist = torch.zeros(1 << 16, dtype=torch.int64, device=self._bits.device)
        for _, bits in self.chunks():
            high = torch.bitwise_right_shift(bits, 16, out=self._spare[:bits.numel()])
            hist += torch.bincount(torch.bitwise_and(bits[high == top], 0xFFFF), minlength=1 << 16)
        return hist

    def position(self, value: int, rank: int) -> int:
        """Index of the ``rank``-th (1-based) entry whose bits equal ``value``."""
        seen = 0
        for start, bits in self.chunks():
            equal = bits == value
            count = int(equal.sum())
            if seen + count >= rank:
                return start + int(equal.nonzero()[rank - seen - 1])
            seen += count
        raise ValueError(f"fewer than {rank} entries equal {value}")


def _largest(bits: _Magnitudes, k: int) -> Cut:
    """The cut above which exactly ``k`` entries of ``bits`` lie (0 < k < n). A radix selection:
    a histogram of the top 15 bits, then one of the low 16 bits of the bin holding the cut (no
    sort, no top-k); ties at the cut go to the lowest indices."""
    hist = bits.top_histogram()
    above = hist.flip(0).cumsum(0)  # above[i]: entries whose top bits ≥ 2^15 − 1 − i
    i = int(torch.searchsorted(above, k))
    top = hist.numel() - 1 - i
    need = k - (int(above[i]) - int(hist[top]))
    hist2 = bits.low_histogram(top)
    above2 = hist2.flip(0).cumsum(0)
    j = int(torch.searchsorted(above2, need))
    low = hist2.numel() - 1 - j
    value, ties = (top << 16) | low, int(hist2[low])
    take = need - (int(above2[j]) - ties)  # of the entries equal to the cut value
    if take == ties:
        return Cut(value)
    return Cut(value, bits.position(value, take) + 1)


# --- the native sampling path --------------------------------------------------------

NATIVE_MIN = 64  # entries: a sample's blocks need as many (smaller tensors take the radix path)
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


def largest_cuts(experts: Sequence[Tensor], base: Tensor | None, wants: Sequence[tuple[int, int]],
                 native_path: bool = True) -> list[Cut]:
    """For each (expert index, k) with 0 < k < n: the cut above which exactly k entries of
    |δ_expert| lie (δ = expert − ``base``; the expert itself when ``base`` is None); ties at the
    cut go to the lowest indices. All experts share one pass where the native path runs
    (``native_path`` False: the radix path only, which gives the same cuts)."""
    select = kernel() if native_path else None
    cuts: list[Cut | None] = [None] * len(wants)
    if wants and select is not None and native.takes([*experts, *([base] if base is not None else [])],
                                                      min_numel=NATIVE_MIN, max_numel=1 << 31):
        for width in WIDTHS:  # a wider band for the cuts the first one missed
            todo = [w for w, c in enumerate(cuts) if c is None]
            if not todo:
                break
            for at in range(0, len(todo), MAX_SLOTS):  # Breadcrumbs over 16 experts asks for more
                batch = todo[at:at + MAX_SLOTS]
                for w, cut in zip(batch, _native_cuts(select, experts, base, [wants[w] for w in batch], width)):
                    cuts[w] = cut
    radix: dict[int, _Magnitudes] = {}  # one per expert: its top histogram serves all its cuts
    for w, (i, k) in enumerate(wants):
        if cuts[w] is None:
            cuts[w] = _largest(radix.setdefault(i, _Magnitudes(experts[i], base)), k)
    return [c for c in cuts if c is not None]


# --- whole tensors on a GPU ------------------------------------------------------------

NO_SPLIT = (1 << 31) - 1  # a tie split no index reaches: every tie is above the cut
