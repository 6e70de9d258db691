"""Fused merges: the streaming pass of a large tensor compiled into one loop.

The eager pass (:func:`workers.streaming.task_vector_merge`) runs ~20 torch ops per expert and
chunk; each is fast, but together they are far from the memory limit. Here the same per-entry
arithmetic — δ_i = θ_i − θ_b, the drop (a counter-based 16-bit DARE draw, or a TIES/Breadcrumbs
magnitude band), the rescale, the sum or TIES election and θ_b + λ·merge — and Consensus/TALL
are written once as whole-tensor ops and handed to ``torch.compile`` (inductor's C++ code
generation), which emits one vectorized loop: each source read once, the target written once,
no chunk buffers.

The ops and their order and dtypes are those of the eager pass, so the result is bit-identical
to it (tested in tests/test_streaming_merge.py): which path a tensor takes changes its speed,
never its value. 16-bit sources (bfloat16, float16) are widened to float32 inside the kernel and
the result rounded once when it is stored (merge arithmetic 2, :mod:`workers.arithmetic`): the
same bits as the float32 merge of the widened sources, without a widened copy in memory.

The path is chosen by size, dtype and device alone (:func:`fusable`, :func:`takes`): on the
CPU, tensors of at least :data:`FUSE_MIN` entries, which the test suite's tiny models never
reach (a few synthetic test tensors do, on purpose); on a GPU every tensor, whole (inductor
emits one Triton kernel per variant: O(1) launches per tensor instead of a dozen per chunk).
Where no compiler works the first failure is logged once and every tensor takes the eager pass
(TIES and Breadcrumbs: :func:`_merge` itself, run uncompiled over chunks).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.profiler import record_function

from evomerge.workers.kernels import band_cuts
from evomerge.workers.kernels.chunks import chunk_size
from evomerge.workers.kernels.selection import NO_SPLIT, native_cuts
from evomerge.workers.kernels.sparsify import MIX, DareDraw, Trim, cut_wants, signed32
from evomerge.workers.kernels.torch_internals import recompile_limit

FUSE_MIN = 1 << 18  # entries (Llama-100M attention: 590 K): smaller stay eager; compiling costs ~10-20 s per process and kernel variant
_HALF_WORD = 1 << 15
_VARIANTS = 64

log = logging.getLogger(__name__)


def _lsr_xor(x: Tensor, shift: int) -> Tensor:
    """x ^ (x >>> shift) on int32 (an arithmetic shift, masked: as the eager stream)."""
    return x ^ ((x >> shift) & ((1 << (32 - shift)) - 1))


def _dare_keep(entry: Tensor, key: Tensor) -> Tensor:
    """Where the DARE draw keeps the entry (``key``: mul, add, threshold): the eager pass's
    (draw − threshold) >> 31 as a compare, so the kernel selects with ``where`` and needs no
    bit casts (which inductor's C++ emits as a scalar loop)."""
    mix0, mix1 = (signed32(m) for m in MIX)
    word = _lsr_xor((entry >> 1) * key[0] + key[1], 16) * mix0
    word = _lsr_xor(_lsr_xor(word, 15) * mix1, 16)
    draw = (word << ((1 - (entry & 1)) << 4)) >> 16  # entry 2j: the low half of word j, sign-extended
    return draw < key[2]


def _band_keep(entry: Tensor, magnitude: Tensor, key: Tensor, cut: Tensor, high: bool) -> Tensor:
    """Where |δ| lies in the band (``key``: the low cut's bits and the index of its tie split, then
    the high cut's; ``cut``: the two cuts' bits as float32). The eager pass compares bit patterns:
    bits ≥ value, or > value from the split on. For non-negative floats that is the float order, so
    the kernel compares |δ| with the cut's float (a bit cast is a scalar loop in inductor's C++)."""
    keep = torch.where(entry >= key[1], magnitude > cut[0], magnitude >= cut[0])
    if high:
        keep = keep & torch.where(entry >= key[3], magnitude <= cut[1], magnitude < cut[1])
    return keep


def _merge(base: Tensor, experts: list[Tensor], out: Tensor, keys: Tensor, reals: Tensor, consensus: bool,
           normalize: bool, highs: tuple[bool, ...] | None, first: int = 0) -> None:
    """θ_b + merge(c_i·keep_i(δ_i)) into ``out`` (flat tensors, computed in float32), keep_i a DARE draw
    (``highs`` None) or a magnitude band (``highs[i]``: whether it has a high cut). ``keys``
    (int32, one row per expert): the draw's or the band's integers; ``reals`` (float32, a row per
    expert, then one): the per-expert factor c_i the eager pass multiplies by, w_i (for the
    normalized TIES divisor), the band's two cuts as floats; last row: λ (TIES only, as eager).
    One integer and one float tensor: on a GPU two small copies beside the one kernel. ``first``: the
    index of the tensors' first entry in the whole tensor (a chunk of it, uncompiled: the DARE draws and
    the tie splits are functions of the index)."""
    coef, weight, cuts, scale = reals[:, 0], reals[:, 1], reals[:, 2:], reals[-1, 0]
    entry = torch.arange(first, first + base.numel(), dtype=torch.int32, device=base.device)
    base, experts = base.float(), [e.float() for e in experts]  # 16-bit: widened in registers (exact)
    pos = neg = acc = None
    if not consensus:
        acc = base * 1.0
    us = []
    for i, expert in enumerate(experts):
        delta = expert - base
        if highs is None:
            keep = _dare_keep(entry, keys[i])
        else:
            keep = _band_keep(entry, delta.abs(), keys[i], cuts[i], highs[i])
        delta = torch.where(keep, delta, 0.0)  # a dropped entry is +0.0, as the eager pass's bitwise and
        if acc is not None:
            acc = acc + delta * coef[i]
            continue
        u = delta * coef[i]
        us.append(u)
        if pos is None:
            pos, neg = u.clamp(min=0), u.clamp(max=0)
        else:
            pos, neg = pos + u.clamp(min=0), neg + u.clamp(max=0)
    if acc is None:
        # the eager pass selects on the sum's sign bit; < 0 differs only at a sum of −0.0, where
        # pos and neg are both −0.0 (same bits), and at NaN (sources are checked finite)
        merged = torch.where((pos + neg) < 0, neg, pos)
        if normalize:
            elected_positive = (pos + neg) >= 0
            divisor = torch.zeros_like(base)
            for i, u in enumerate(us):
                divisor = divisor + torch.where(elected_positive, u > 0, u < 0) * weight[i]
            merged = merged / torch.where(divisor == 0, 1.0, divisor)
        acc = base + merged * scale
    out.copy_(acc)


def _consensus_merge(base: Tensor, experts: list[Tensor], out: Tensor, reals: Tensor, need: int,
                     normalized: bool) -> None:
    """Consensus/TALL (the eager ops of ``operators.consensus``, same order, in float32) into ``out``;
    ``reals``: a row (w_i, λ_i) per expert, then (Σ w, λ); ``need``: the votes an entry needs."""
    weight, tall, divisor, scale = reals[:, 0], reals[:, 1], reals[-1, 0] if normalized else None, reals[-1, 1]
    base, experts = base.float(), [e.float() for e in experts]
    weighted = [(e - base) * weight[i] for i, e in enumerate(experts)]
    total = torch.zeros_like(base)
    for u in weighted:
        total = total + u
    votes = torch.zeros_like(base, dtype=torch.int32)
    for i, u in enumerate(weighted):
        votes = votes + (u.abs() > (total - u).abs() * tall[i])
    total = total * (votes >= need)
    if divisor is not None:
        total = total / divisor
    out.copy_(total * scale + base)


class Compiled:
    """A kernel compiled on first use; ``broken`` (and every call False) once a call failed,
    logged once: the caller then merges eagerly, with the same results."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self._fn, self._compiled, self.broken = fn, None, False

    @property
    def available(self) -> bool:
        """Not broken, and not turned off (``EVOMERGE_FUSED=0``: the eager pass, same bits)."""
        return not self.broken and os.environ.get("EVOMERGE_FUSED", "1") != "0"

    def __call__(self, *args: object) -> bool:
        if not self.available:
            return False
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self._fn, dynamic=True, fullgraph=True)
            # one variant per expert count, election, band shape and thread count: more than
            # dynamo's default 8 (past it, fullgraph fails and every merge would go eager)
            with recompile_limit(_VARIANTS):
                self._compiled(*args)
            return True
        except Exception as error:  # no compiler, unsupported platform: the eager pass is exact too
            self.broken = True
            log.warning("fused merges off (torch.compile failed: %s); merging eagerly", str(error).splitlines()[0])
            return False


_MERGE = Compiled(_merge)
_CONSENSUS = Compiled(_consensus_merge)


FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def takes(tensors: Sequence[Tensor]) -> bool:
    """Whether a merge of these tensors (base first) is fused: one float dtype of :data:`FLOATS`,
    contiguous, on one device, all of the base's size, under 2^31 entries, and on the CPU at least
    FUSE_MIN (a kernel that cannot compile then reports False and the caller merges eagerly)."""
    first = tensors[0]
    n, dtype, device = first.numel(), first.dtype, first.device
    smallest = FUSE_MIN if device.type == "cpu" else 1
    return (smallest <= n < 1 << 31 and dtype in FLOATS
            and all(t.dtype == dtype and t.is_contiguous() and t.numel() == n and t.device == device for t in tensors))


def fusable(base: Tensor, experts: Sequence[Tensor], keep: Sequence[object], consensus: bool, out: Tensor | None) -> bool:
    """Whether the fused kernel computes this DARE merge: tensors it :func:`takes` and a DARE draw
    for every expert, summed or with the TIES election (the eager sums of these multiply then add,
    as the kernel does). TIES and Breadcrumbs take :func:`trimmed_merge`."""
    return (len(experts) > 0 and all(isinstance(k, DareDraw) for k in keep)
            and takes([base, *experts, *([out] if out is not None else [])]))


def _keys(keep: Sequence[DareDraw]) -> tuple[list[list[int]], list[float]]:
    """Per expert: the kernel's integer row and the survivors' rescale."""
    rows, rescales = [], []
    for k in keep:
        if k.keep_all:  # eager skips the drop: a threshold above every draw keeps all
            rows.append([signed32(k.stream.mul), signed32(k.stream.add), _HALF_WORD])
            rescales.append(1.0)
        elif k.probability <= 0.0:  # eager zeroes δ: a threshold below every draw
            rows.append([signed32(k.stream.mul), signed32(k.stream.add), -_HALF_WORD])
            rescales.append(1.0)
        else:
            rows.append([signed32(k.stream.mul), signed32(k.stream.add), k.threshold])
            rescales.append(1.0 / k.probability)
    return rows, rescales


def merge(base: Tensor, experts: Sequence[Tensor], weight: Sequence[float], keep: Sequence[DareDraw],
          *, scale: float, coeff: float, consensus: bool, normalize: bool, out: Tensor) -> bool:
    """Run the fused kernel into ``out`` (see :func:`fusable`); False when it could not run (then
    nothing is promised about ``out``). ``coeff``: the eager pass's λ/Σw factor (sums only)."""
    with record_function("evomerge.host"):  # built on the host, then one copy each to the device
        rows, rescales = _keys(keep)
        coefs = [w * r if consensus else coeff * w * r for w, r in zip(weight, rescales)]
        keys = torch.tensor(rows, dtype=torch.int32)
        reals = torch.zeros(len(rows) + 1, 2)  # each Python scalar rounded to float32 as eager rounds it
        reals[:-1, 0], reals[:-1, 1], reals[-1, 0] = torch.tensor(coefs), torch.tensor(weight), scale
    keys, reals = _to_device(base.device, keys, reals)
    return _MERGE(base.view(-1), [e.view(-1) for e in experts], out.view(-1), keys, reals,
                  consensus, consensus and normalize, None)


def _to_device(device: torch.device, *tensors: Tensor) -> list[Tensor]:
    """Host tensors on ``device`` (profiled as ``evomerge.h2d:N``: N copies on a GPU, none on the CPU)."""
    with record_function(f"evomerge.h2d:{len(tensors)}"):
        return [t.to(device) for t in tensors]


_SELECT = Compiled(band_cuts.select)


def _selected(experts: Sequence[Tensor], base: Tensor | None, wants: Sequence[tuple[int, int]], consts: list[int],
              picks: list[int], scratch: int = band_cuts.CUT_SCRATCH) -> Tensor:
    """:func:`workers.band_cuts.select` of the cuts ``wants``, then the ``consts``, as ``picks`` chooses,
    on the tensors' device: one copy of a host table, one compiled graph (uncompiled where no
    compiler works), no read back. Cuts whose rows would outgrow ``scratch`` bytes are selected a
    group at a time (a graph each), then picked from."""
    flats = [e.reshape(-1) for e in experts]
    group = band_cuts.group_size(len(wants), flats[0].numel(), scratch)
    if group < len(wants):  # rows too large for one graph: each group's cuts, then the picks
        parts = [wants[at:at + group] for at in range(0, len(wants), group)]
        cuts = torch.cat([_selected(experts, base, part, band_cuts.CONSTS, list(range(2 * len(part))), scratch)
                          for part in parts])
        with record_function("evomerge.host"):
            tables = torch.tensor([*consts, *picks], dtype=torch.int32)
        (tables,) = _to_device(flats[0].device, tables)
        return torch.cat([cuts, tables[:len(consts)]])[tables[len(consts):]]
    rows, rank, depth, head = band_cuts.plan(wants, flats[0].numel())
    with record_function("evomerge.host"):
        table = torch.tensor([*head, *consts, *picks], dtype=torch.int32)
    (table,) = _to_device(flats[0].device, table)
    out = torch.empty(len(picks), dtype=torch.int32, device=flats[0].device)
    args = (base.reshape(-1) if base is not None else None, flats, rows, rank, depth, table, out)
    if not _SELECT(*args):
        band_cuts.select(*args)
    return out


def device_cuts(experts: Sequence[Tensor], base: Tensor | None, wants: Sequence[tuple[int, int]],
                scratch: int = band_cuts.CUT_SCRATCH) -> Tensor:
    """For each (expert index, k) with 0 < k < n, a row (value, until) of int32 on the tensors' device:
    the bits of the k-th largest |δ_expert| (δ = expert − ``base``, the expert itself when None) and
    the index from which entries equal to it are no longer above the cut (NO_SPLIT where every tie is
    above; ties go to the lowest indices), by whole-tensor ops with no read back: the host never waits
    for the device. Exact, the cuts of :func:`workers.selection.native_cuts` (tested), but a selection
    (``kthvalue``) over all the cuts' rows at once (:mod:`workers.band_cuts`; in groups of cuts
    whose rows stay within ``scratch`` bytes): for GPUs, and for CPU tensors the native selection
    does not take."""
    if not wants:
        return torch.empty(0, 2, dtype=torch.int32, device=experts[0].device)
    picks = list(range(2 * len(wants)))
    return _selected(experts, base, wants, band_cuts.CONSTS, picks, scratch).view(len(wants), 2)


def _native_rows(experts: Sequence[Tensor], base: Tensor | None, wants: Sequence[tuple[int, int]]) -> Tensor | None:
    """The cuts of :func:`device_cuts` from the native selection, on the host; None where it does not
    take the tensors or a cut's sample misled twice (practically never)."""
    found = native_cuts(experts, base, wants)
    if found is None or any(c is None for c in found):
        return None
    rows = [[c.value, NO_SPLIT if c.until is None else c.until] for c in found if c is not None]
    return torch.tensor(rows, dtype=torch.int32).reshape(len(wants), 2)


def trim_cuts(experts: Sequence[Tensor], base: Tensor | None, wants: Sequence[tuple[int, int]],
              native_path: bool = True) -> Tensor:
    """The cuts of :func:`device_cuts`: on the CPU from the native selection where it takes the
    tensors (``native_path`` False: never), else (a GPU, float16, small tensors, no compiler, a
    cut whose sample misled twice) from :func:`device_cuts`. The same rows either way."""
    found = _native_rows(experts, base, wants) if native_path else None
    return found if found is not None else device_cuts(experts, base, wants)


def trimmed_merge(base: Tensor, experts: Sequence[Tensor], weight: Sequence[float], trims: Sequence[Trim], *,
                  scale: float, coeff: float, consensus: bool, normalize: bool, out: Tensor,
                  native_path: bool = True) -> None:
    """A TIES/Breadcrumbs merge (``trims``, see :func:`workers.streaming.trimmed_merge`) into ``out``:
    the kernel's keys from the native cuts on the host, or with the cuts on the tensors' device in
    one graph (:func:`_selected`: no read back), then :func:`_merge`, compiled where :func:`takes`
    and a compiler allow, else the same function run uncompiled over chunks of the tensor. The
    same values on every path."""
    if not experts:
        out.copy_(base)
        return
    wants = cut_wants(trims)
    with record_function("evomerge.host"):
        consts, picks, highs = band_cuts.keys_table(trims, weight, [w if consensus else coeff * w for w in weight],
                                                    scale)
    cuts = _native_rows(experts, base, wants) if native_path and wants else None
    if cuts is not None or not wants:  # every key known on the host
        with record_function("evomerge.host"):
            known = cuts.reshape(-1) if cuts is not None else torch.empty(0, dtype=torch.int32)
            block = torch.cat([known, torch.tensor(consts, dtype=torch.int32)])[picks]
        (block,) = _to_device(base.device, block)
    else:
        block = _selected(experts, base, wants, consts, picks)
    block = block.view(-1, 4)
    keys, reals = block[:len(trims)], block[len(trims):].view(torch.float32)
    args = (keys, reals, consensus, consensus and normalize, highs)
    if takes([base, *experts, out]) and _MERGE(base.view(-1), [e.view(-1) for e in experts], out.view(-1), *args):
        return
    _merge_in_chunks(base, experts, out, *args)


def _merge_in_chunks(base: Tensor, experts: Sequence[Tensor], out: Tensor, *args: object) -> None:
    """:func:`_merge` uncompiled (no compiler, ``EVOMERGE_FUSED=0``, tensors the compiled kernel does
    not take), over chunks of :func:`workers.chunks.chunk_size` entries (at most 2^24: a GPU's
    chunk is a whole tensor, and this runs ~15 temporaries of a chunk) so that its memory stays
    chunk-sized: each chunk is told its first entry's index. Any layout and float dtype."""
    flat_base, flats = base.reshape(-1), [e.reshape(-1) for e in experts]
    flat_out = out.view(-1) if out.is_contiguous() else torch.empty(out.numel(), dtype=out.dtype, device=out.device)
    size = min(chunk_size(base.device), 1 << 24)
    for start in range(0, flat_base.numel(), size):
        stop = start + size
        _merge(flat_base[start:stop], [f[start:stop] for f in flats], flat_out[start:stop], *args, first=start)
    if not out.is_contiguous():
        out.copy_(flat_out.view(out.shape))


def consensus_merge(base: Tensor, experts: Sequence[Tensor], weight: Sequence[float], tall: Sequence[float], need: int,
                    divisor: float | None, scale: float, out: Tensor) -> bool:
    """Consensus/TALL of tensors the kernel :func:`takes` into ``out``; False when
    it could not run. ``divisor``: Σ w when normalized, else None."""
    with record_function("evomerge.host"):
        reals = torch.tensor([*zip(weight, tall), (1.0 if divisor is None else divisor, scale)], dtype=torch.float32)
    (reals,) = _to_device(base.device, reals)
    return _CONSENSUS(base.view(-1), [e.view(-1) for e in experts], out.view(-1), reals, need, divisor is not None)
