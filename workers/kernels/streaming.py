"""Streaming merges: one pass over each tensor in cache-sized chunks, nothing of the tensor's size.

Two helpers that the operators build on:

- :func:`combine`: Σ c_j·t_j (linear, task arithmetic, SLERP, Model Stock); float32/bf16 CPU
  tensors in one native pass (``combine.cpp``), the same bits as the chunked ops.
- :func:`task_vector_merge`: θ_b + λ·merge(w_i·keep_i(δ_i)) with δ_i = θ_i − θ_b formed chunk by
  chunk, the per-expert drop (a DARE draw from a counter-based stream, or a precomputed
  mask) and the TIES election fused into the same pass: each source is read once and the
  target written once, and the work per chunk stays in cache.

Chunks are processed in order with torch's intra-op threads (each op of a chunk is split
over ``torch.get_num_threads()`` threads), so a worker with N threads uses them and the
result does not depend on N: every op is elementwise, and the random bits of entry j are a
function of (stream key, j) only (see :class:`workers.sparsify.Stream`).

Large DARE merges skip the chunk loop: :mod:`workers.fused` runs the same ops as one compiled
loop, with bit-identical results (see :func:`fused.fusable`). TIES and Breadcrumbs(-TIES) do not
take the chunk loop at all (:func:`trimmed_merge`: the native one pass, or their cuts then the fused
merge).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from evomerge.workers.kernels import fused, magnitude_merge, native
from evomerge.workers.kernels.chunks import chunk_size
from evomerge.workers.kernels.precision import HALF, working_dtype
from evomerge.workers.kernels.sparsify import DareDraw, Trim

_INT_OF = {4: torch.int32, 2: torch.int16}
_SIGN_SHIFT = {4: 31, 2: 15}


_COMBINE_ARGS = (ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_float), ctypes.c_int,
                 ctypes.c_int64, ctypes.c_int, ctypes.c_void_p)
_MAX_TERMS = 18


def combine(terms: Sequence[tuple[Tensor, float]], out: Tensor | None, native_path: bool = True) -> Tensor:
    """Σ c_j·t_j in one streaming pass: each input read once, ``out`` written once. In a
    16-bit dtype each chunk is summed in a float32 buffer and rounded once (bf16 keeps 8
    mantissa bits: rounding after every term would compound one error per model).
    float32 and bfloat16 tensors on the CPU take the native pass (``combine.cpp``; ``native_path``
    False: never), the same ops entry by entry: the same bits."""
    first = terms[0][0]
    result = torch.empty_like(first) if out is None else out
    fn = native.kernel("combine", "evomerge_combine", _COMBINE_ARGS) if native_path else None
    tensors = [t for t, _ in terms]
    if fn is not None and len(terms) <= _MAX_TERMS and native.takes([result, *tensors]):
        status = fn(native.DTYPES[result.dtype], native.pointers(tensors),
                    (ctypes.c_float * len(terms))(*[c for _, c in terms]), len(terms), result.numel(),
                    native.threads(), result.data_ptr())
        if status == 0:
            return result
        if status != 1:  # 1: this build declines (a CPU without FMA), the torch path sums
            raise ValueError(f"native combine rejected its arguments ({len(terms)} terms of {result.numel()} entries)")
    flat_out, flats = result.view(-1), [(t.reshape(-1), c) for t, c in terms]
    size = chunk_size(result.device)
    wide = (torch.empty(min(size, flat_out.numel()), dtype=torch.float32, device=result.device)
            if result.dtype in HALF else None)
    for start in range(0, flat_out.numel(), size):
        piece = flat_out[start:start + size]
        acc = piece if wide is None else wide[:piece.numel()]
        tensor, coeff = flats[0]
        if wide is None:
            torch.mul(tensor[start:start + size], coeff, out=acc)
        else:
            acc.copy_(tensor[start:start + size]).mul_(coeff)
        for tensor, coeff in flats[1:]:
            acc.add_(tensor[start:start + size], alpha=coeff)
        if wide is not None:
            piece.copy_(acc)
    return result


# per expert: a DARE draw, a boolean keep mask of the tensor's shape, or None (keep all)
Keep = DareDraw | Tensor | None


@dataclass
class _Scratch:
    """Chunk-sized buffers of one merge (allocated once per tensor); ``base`` holds the widened
    base chunk of a 16-bit merge (empty otherwise)."""

    base: Tensor
    delta: Tensor
    pos: Tensor
    neg: Tensor
    tmp: Tensor
    words: Tensor
    spare: Tensor
    bits: Tensor
    index: Tensor


def _scratch(like: Tensor, size: int) -> _Scratch:
    """Buffers in the working dtype: float32 for 16-bit sources (merge arithmetic 2)."""
    dev, dtype = like.device, working_dtype(like.dtype)
    words = (size + 1) // 2
    return _Scratch(base=torch.empty(size if dtype != like.dtype else 0, dtype=dtype, device=dev),
                    delta=torch.empty(size, dtype=dtype, device=dev),
                    pos=torch.empty(size, dtype=dtype, device=dev),
                    neg=torch.empty(size, dtype=dtype, device=dev),
                    tmp=torch.empty(size, dtype=dtype, device=dev),
                    words=torch.empty(words, dtype=torch.int32, device=dev),
                    spare=torch.empty(words, dtype=torch.int32, device=dev),
                    bits=torch.empty(size, dtype=torch.int32, device=dev),
                    index=torch.arange(words, dtype=torch.int32, device=dev))


def _drop(delta: Tensor, keep: Keep, start: int, s: _Scratch) -> float:
    """Zero the dropped entries of the chunk ``delta`` (which starts at entry ``start``) in
    place; returns the survivors' rescale (1/p for DARE, 1 otherwise)."""
    if keep is None:
        return 1.0
    n = delta.numel()
    if isinstance(keep, Tensor):
        delta.mul_(keep.view(-1)[start:start + n])
        return 1.0
    if keep.keep_all:
        return 1.0
    if keep.probability <= 0.0:
        delta.zero_()
        return 1.0
    bits = keep.mask_bits(start, s.bits[:n], s.words, s.spare, s.index)  # -1 where kept, 0 where dropped
    ints = _INT_OF[delta.element_size()]
    if ints == torch.int16:
        delta.view(ints).bitwise_and_(bits.to(ints))
    else:
        delta.view(ints).bitwise_and_(bits)
    return 1.0 / keep.probability


def _elect_into(pos: Tensor, neg: Tensor, tmp: Tensor) -> Tensor:
    """TIES election of a chunk: ``pos`` where pos + neg ≥ 0, else ``neg`` (written into pos).
    Bitwise select on the sum's sign bit, cheaper than a boolean mask and torch.where; the
    only difference, a sum of −0.0, arises when both are zeros."""
    ints = _INT_OF[pos.element_size()]
    torch.add(pos, neg, out=tmp)
    sign = tmp.view(ints).bitwise_right_shift_(_SIGN_SHIFT[pos.element_size()])  # -1 where negative
    diff = neg.view(ints).bitwise_xor_(pos.view(ints)).bitwise_and_(sign)
    pos.view(ints).bitwise_xor_(diff)
    return pos


def task_vector_merge(base: Tensor, experts: Sequence[Tensor], weight: Sequence[float], *, scale: float,
                      normalize: bool, consensus: bool, out: Tensor | None,
                      keep: Sequence[Keep] | None = None, deltas: bool = False) -> Tensor:
    """θ_b + λ·merge(w_i·keep_i(δ_i)) in one streaming pass. ``merge`` is a plain sum
    (normalized: / Σ w_i) or, with ``consensus``, the TIES election: the sign of Σ u_i
    (+1 on a zero sum), summing only agreeing entries (normalized: divided by the agreeing
    experts' weights). With ``deltas`` the ``experts`` are task vectors already."""
    result = torch.empty_like(base) if out is None else out
    keep = list(keep) if keep is not None else [None] * len(experts)
    coeff = _sum_factor(weight, scale, normalize, consensus)
    if not deltas and fused.fusable(base, experts, keep, consensus, result) and fused.merge(
            base, experts, weight, keep, scale=scale, coeff=coeff, consensus=consensus, normalize=normalize, out=result):
        return result
    n = base.numel()
    size = min(chunk_size(base.device), max(n, 1))
    s = _scratch(base, size)
    flat_base, flat_out = base.reshape(-1), result.view(-1)
    flats = [e.reshape(-1) for e in experts]
    for start in range(0, n, size):
        stop = min(n, start + size)
        m = stop - start
        b = flat_base[start:stop]
        if s.base.numel():  # 16-bit: the base chunk widened once, every δ formed in float32
            b = s.base[:m].copy_(b)
        pos, neg, tmp = s.pos[:m], s.neg[:m], s.tmp[:m]
        if not consensus:
            torch.mul(b, 1.0, out=pos)
        first = True
        for flat, k, w in zip(flats, keep, weight):
            delta, rescale = _expert_delta(flat, b, k, start, s, deltas)
            if not consensus:
                if not (deltas or isinstance(k, Tensor)):  # two roundings, as the fused kernel (no FMA there)
                    pos.add_(delta.mul_(coeff * w * rescale))
                else:
                    pos.add_(delta, alpha=coeff * w * rescale)
                continue
            delta.mul_(w * rescale)
            if first:
                torch.clamp(delta, min=0, out=pos)
                torch.clamp(delta, max=0, out=neg)
                first = False
            else:
                pos.add_(torch.clamp(delta, min=0, out=tmp))
                neg.add_(torch.clamp(delta, max=0, out=tmp))
        if not consensus:
            flat_out[start:stop].copy_(pos)
            continue
        if first:  # no experts: nothing to add
            pos.zero_()
            neg.zero_()
        if normalize:
            divisor = _agreeing_weights(flats, keep, weight, b, start, stop, pos, neg, s, deltas)
        merged = _elect_into(pos, neg, tmp)
        if normalize:
            merged.div_(divisor.masked_fill_(divisor == 0, 1.0))
        if scale != 1.0:
            merged.mul_(scale)
        torch.add(b, merged, out=flat_out[start:stop])
    return result


def trimmed_merge(base: Tensor, experts: Sequence[Tensor], weight: Sequence[float], trims: Sequence[Trim], *,
                  scale: float, normalize: bool, consensus: bool, out: Tensor | None,
                  native_cuts: bool = True) -> Tensor:
    """θ_b + λ·merge(w_i·trim_i(δ_i)) of magnitude-trimmed task vectors (TIES, Breadcrumbs), the
    merge of :func:`task_vector_merge`. Two implementations, the same bits:

    - one native pass (:mod:`workers.magnitude_merge`: CPU with AVX-512, float32/bfloat16), which
      selects the cuts and merges in one read of the sources (1.5-3.2x the other on this CPU, median 1.85x:
      docs/performance.md, benchmarks/ties_paths.py);
    - everywhere else, and where the one pass declines (a sample misled), the cuts (the native
      selection on the CPU, else :func:`fused.device_cuts`; ``native_cuts`` False: the latter,
      and no one pass) then the fused merge, compiled or run uncompiled over chunks
      (:func:`fused.trimmed_merge`)."""
    result = torch.empty_like(base) if out is None else out
    coeff = _sum_factor(weight, scale, normalize, consensus)
    if native_cuts and magnitude_merge.merge(base, experts, trims, weight, coeff=coeff, scale=scale,
                                             consensus=consensus, normalize=normalize, out=result):
        return result
    fused.trimmed_merge(base, experts, weight, trims, scale=scale, coeff=coeff, consensus=consensus,
                        normalize=normalize, out=result, native_path=native_cuts)
    return result


def _sum_factor(weight: Sequence[float], scale: float, normalize: bool, consensus: bool) -> float:
    """λ, or λ/Σw for a normalized sum: the factor of w_i·δ_i in a summed merge."""
    return scale / (_guarded(sum(weight)) if normalize and not consensus else 1.0)


def _expert_delta(flat: Tensor, b: Tensor, keep: Keep, start: int, s: _Scratch, given: bool) -> tuple[Tensor, float]:
    """The chunk of one expert's task vector (from ``start``, as long as ``b``) with its drop
    applied, in ``s.delta``, and the survivors' rescale."""
    delta = s.delta[:b.numel()]
    if given:
        delta.copy_(flat[start:start + b.numel()])
    else:
        torch.sub(flat[start:start + b.numel()], b, out=delta)
    return delta, _drop(delta, keep, start, s)


def _agreeing_weights(flats: Sequence[Tensor], keep: Sequence[Keep], weight: Sequence[float], b: Tensor,
                      start: int, stop: int, pos: Tensor, neg: Tensor, s: _Scratch, deltas: bool) -> Tensor:
    """Σ w_i over the experts whose u_i agrees with the elected sign (a second pass over the
    chunk, redrawing the same masks: normalized TIES only)."""
    m = stop - start
    elected_positive = (pos + neg) >= 0
    divisor = torch.zeros(m, dtype=pos.dtype, device=pos.device)
    for flat, k, w in zip(flats, keep, weight):
        delta, rescale = _expert_delta(flat, b, k, start, s, deltas)
        delta.mul_(w * rescale)
        divisor += torch.where(elected_positive, delta > 0, delta < 0) * w
    return divisor


def _guarded(total: float) -> float:
    return total if abs(total) >= 1e-8 else 1.0
