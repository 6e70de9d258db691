"""Fused DARE merges: the streaming pass of a large tensor compiled into one loop.

The eager pass (:func:`workers.streaming.task_vector_merge`) runs ~20 torch ops per expert and
chunk; each is fast, but together they are far from the memory limit. Here the same per-entry
arithmetic — δ_i = θ_i − θ_b, the counter-based 16-bit draw, the drop, the rescale, the TIES
election and θ_b + λ·merge — is written once as whole-tensor ops and handed to
``torch.compile`` (inductor's C++ code generation), which emits one vectorized loop: each
source read once, the target written once, no chunk buffers.

The ops and their order and dtypes are those of the eager pass, so the result is bit-identical
to it (tested in tests/test_streaming_merge.py): which path a tensor takes changes its speed,
never its value. The path is chosen by size and dtype alone (:func:`fusable`), float32 tensors of
at least :data:`FUSE_MIN` entries, which the test suite's tiny models never reach; where no
compiler works the first failure is logged once and every tensor takes the eager pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from evomerge.workers.sparsify import MIX, DareDraw, signed32

FUSE_MIN = 1 << 20  # entries: smaller tensors stay eager (compiling costs ~10-20 s once per process and shape family)
_HALF_WORD = 1 << 15

log = logging.getLogger(__name__)


def _lsr_xor(x: Tensor, shift: int) -> Tensor:
    """x ^ (x >>> shift) on int32 (an arithmetic shift, masked: as the eager stream)."""
    return x ^ ((x >> shift) & ((1 << (32 - shift)) - 1))


def _dare_merge(base: Tensor, experts: list[Tensor], out: Tensor, keys: Tensor, coef: Tensor, scale: Tensor,
                consensus: bool) -> None:
    """θ_b + merge(c_i·DARE(δ_i)) into ``out`` (flat float32 tensors). ``keys`` (int32, one row
    per expert): the stream's mul, add and the draw threshold; ``coef`` (float32): the
    per-expert factor the eager pass multiplies by; ``scale``: λ (TIES only, as eager)."""
    mix0, mix1 = (signed32(m) for m in MIX)
    entry = torch.arange(base.numel(), dtype=torch.int32, device=base.device)
    word_index, low_half = entry >> 1, (1 - (entry & 1)) << 4  # entry 2j: the low half of word j
    pos = neg = acc = None
    if not consensus:
        acc = base * 1.0
    for i, expert in enumerate(experts):
        word = _lsr_xor(word_index * keys[i, 0] + keys[i, 1], 16) * mix0
        word = _lsr_xor(_lsr_xor(word, 15) * mix1, 16)
        draw = (word << low_half) >> 16  # the half, sign-extended
        keep = (draw - keys[i, 2]) >> 31  # -1 where kept
        delta = ((expert - base).view(torch.int32) & keep).view(torch.float32)
        if acc is not None:
            acc = acc + delta * coef[i]
            continue
        u = delta * coef[i]
        if pos is None:
            pos, neg = u.clamp(min=0), u.clamp(max=0)
        else:
            pos, neg = pos + u.clamp(min=0), neg + u.clamp(max=0)
    if acc is None:
        sign = (pos + neg).view(torch.int32) >> 31
        diff = (neg.view(torch.int32) ^ pos.view(torch.int32)) & sign
        acc = base + (pos.view(torch.int32) ^ diff).view(torch.float32) * scale
    out.copy_(acc)


def _consensus_merge(base: Tensor, experts: list[Tensor], out: Tensor, weight: Tensor, tall: Tensor, need: Tensor,
                     divisor: Tensor | None, scale: Tensor) -> None:
    """Consensus/TALL (the eager ops of ``operators.consensus``, same order and dtypes) into ``out``."""
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


class _Compiled:
    """The compiled kernel, built on first use; None once compiling failed (logged once)."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self._fn, self._compiled, self.broken = fn, None, False

    def __call__(self, *args: object) -> bool:
        if self.broken:
            return False
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self._fn, dynamic=True, fullgraph=True)
            self._compiled(*args)
            return True
        except Exception as error:  # no compiler, unsupported platform: the eager pass is exact too
            self.broken = True
            log.warning("fused merges off (torch.compile failed: %s); merging eagerly", str(error).splitlines()[0])
            return False


_DARE = _Compiled(_dare_merge)
_CONSENSUS = _Compiled(_consensus_merge)


def large_float32(tensors: Sequence[Tensor]) -> bool:
    """Whether a merge of these tensors (base first) is fused: float32, contiguous, on the CPU,
    all of the base's size, at least FUSE_MIN and under 2^31 entries (a kernel that cannot
    compile then reports False and the caller merges eagerly)."""
    n = tensors[0].numel()
    return (FUSE_MIN <= n < 1 << 31
            and all(t.dtype == torch.float32 and t.is_contiguous() and t.numel() == n and t.device.type == "cpu"
                    for t in tensors))


def fusable(base: Tensor, experts: Sequence[Tensor], keep: Sequence[object], consensus: bool, normalize: bool,
            out: Tensor | None) -> bool:
    """Whether the fused DARE kernel computes this merge: :func:`large_float32` tensors, a DARE
    draw for every expert, and no normalized TIES (its agreeing-weight divisor stays eager)."""
    return (len(experts) > 0 and not (consensus and normalize) and all(isinstance(k, DareDraw) for k in keep)
            and large_float32([base, *experts, *([out] if out is not None else [])]))


def dare_merge(base: Tensor, experts: Sequence[Tensor], weight: Sequence[float], keep: Sequence[DareDraw], *,
               scale: float, coeff: float, consensus: bool, out: Tensor) -> bool:
    """Run the fused kernel into ``out`` (see :func:`fusable`); False when it could not run (then
    nothing is promised about ``out``). ``coeff``: the eager pass's λ/Σw factor (sums only)."""
    rows, coefs = [], []
    for draw, w in zip(keep, weight):
        if draw.keep_all:  # eager skips the drop: a threshold above every draw keeps all
            threshold, rescale = _HALF_WORD, 1.0
        elif draw.probability <= 0.0:  # eager zeroes δ: a threshold below every draw
            threshold, rescale = -_HALF_WORD, 1.0
        else:
            threshold, rescale = draw.threshold, 1.0 / draw.probability
        rows.append([signed32(draw.stream.mul), signed32(draw.stream.add), threshold])
        coefs.append(w * rescale if consensus else coeff * w * rescale)
    keys = torch.tensor(rows, dtype=torch.int32)
    coef = torch.tensor(coefs, dtype=torch.float32)  # each rounded as eager rounds its Python scalar
    return _DARE(base.view(-1), [e.view(-1) for e in experts], out.view(-1), keys, coef,
                 torch.tensor(scale, dtype=torch.float32), consensus)


def consensus_merge(base: Tensor, experts: Sequence[Tensor], weight: Sequence[float], tall: Sequence[float], need: int,
                    divisor: float | None, scale: float, out: Tensor) -> bool:
    """Consensus/TALL of :func:`large_float32` tensors into ``out`` by the fused kernel; False when
    it could not run. ``divisor``: Σ w when normalized, else None."""
    f32 = torch.float32
    return _CONSENSUS(base.view(-1), [e.view(-1) for e in experts], out.view(-1), torch.tensor(weight, dtype=f32),
                      torch.tensor(tall, dtype=f32), torch.tensor(need, dtype=torch.int32),
                      None if divisor is None else torch.tensor(divisor, dtype=f32), torch.tensor(scale, dtype=f32))
