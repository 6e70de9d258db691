"""TIES and Breadcrumbs(-TIES) merges of float32 and bfloat16 tensors in one pass (``band_merge.cpp``).

Their trims keep the top k of each expert's |δ|, so a two-step merge reads every source twice:
once to select the cuts (:mod:`workers.selection`), once to merge (:func:`workers.fused.trimmed_merge`).
The native kernel brackets each cut by a sample, merges in one pass every entry whose keep is
already certain, and merges again only the few entries inside a bracket once the exact cuts are
known from them: the same values, bit for bit, as the two-step path (its ops in float32, no FMA;
bfloat16 sources widened and the result rounded once), which remains the path where the kernel
cannot run or a bracket misses (rare; tested). Kept because it measured 1.5-3.2x the two-step
path on this CPU (issue 19's bar is 1.5x: docs/performance.md, benchmarks/ties_paths.py).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.workers.kernels import native
from evomerge.workers.kernels.selection import NATIVE_MIN, WIDTHS, sample_size
from evomerge.workers.kernels.sparsify import Trim


_ARGS = (ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
         ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_float),
         ctypes.POINTER(ctypes.c_float), ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_double,
         ctypes.c_int)


def eligible(base: Tensor, experts: Sequence[Tensor], out: Tensor) -> bool:
    """Float32 or bfloat16 (one dtype), contiguous, on the CPU, all of one size of at least
    NATIVE_MIN and under 2^31 entries, at most 16 experts: what the kernel takes."""
    return 0 < len(experts) <= 16 and native.takes([base, out, *experts], tuple(native.DTYPES), NATIVE_MIN, 1 << 31)


def merge(base: Tensor, experts: Sequence[Tensor], trims: Sequence[Trim], weight: Sequence[float], *,
          coeff: float, scale: float, consensus: bool, normalize: bool, out: Tensor) -> bool:
    """θ_b + λ·merge(w_i·trim_i(δ_i)) into ``out`` in one pass (see :func:`eligible`): summed with
    factors ``coeff``·w_i, or by the TIES election (normalized: the agreeing weights' mean) with
    λ = ``scale``. False where the kernel is unavailable or a bracket missed (``out`` is then
    partly written: merge another way)."""
    band_merge = native.kernel("band_merge", "evomerge_band_merge", _ARGS)
    if band_merge is None or not eligible(base, experts, out):
        return False
    n, count = base.numel(), len(experts)
    factors = [w if consensus else coeff * w for w in weight]  # rounded to float32 as the eager pass rounds them
    status = band_merge(
        native.DTYPES[base.dtype], base.data_ptr(), native.pointers(experts), count, n, out.data_ptr(),
        (ctypes.c_int64 * count)(*[t.keep for t in trims]), (ctypes.c_int64 * count)(*[t.drop for t in trims]),
        (ctypes.c_float * count)(*factors), (ctypes.c_float * count)(*weight), scale, int(consensus),
        int(consensus and normalize), sample_size(n), WIDTHS[0], native.threads())
    if status < 0:
        raise ValueError(f"band merge rejected its arguments (n={n}, {count} experts)")
    # 0: a bracket missed (rare): the two-step path selects with its own retries; 2: a build without
    # AVX-512 declines (its scalar pass is slower than the selection and the compiled merge)
    return status == 1
