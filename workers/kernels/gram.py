"""Inner products of task vectors, ⟨δ_i, δ_k⟩ with δ_i = x_i − θ_b: the cosines of Model Stock and
SLERP, as float64 scalar tensors (a :data:`Gram`: ``g[i][k]``).

Each entry of δ is formed in float32 (16-bit sources widened first; float64 sources stay
float64), its products are exact in float64 and summed in float64, so a Gram entry carries a
relative error of ~1e-16·√n whichever path computes it. Two paths:

- native (:func:`gram`, ``gram.cpp``): float32 and bfloat16 tensors on the CPU, one pass over all
  of them with the machine's vector unit, fixed blocks summed in order, so the result does not
  depend on the thread count;
- whole-tensor torch ops (:func:`whole_gram`), for everything else (GPU tensors, float16,
  ``EVOMERGE_NATIVE=0``): written to be traced into the compiled graph of
  :mod:`workers.geometry`, where the products are formed in registers and reduced on the
  tensors' device, nothing read back.

The two differ in the order of their float64 sums only, far below what the float32 coefficients
derived from the Gram (a cosine, t) can show: the merges they feed come out the same.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.workers.kernels import native
from evomerge.workers.kernels.precision import working_dtype

Gram = list[list[Tensor]]  # ⟨δ_i, δ_k⟩ as 0-d float64 tensors; g[i][k] is g[k][i]

_MAX_TENSORS = 16
_ARGS = (ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int64, ctypes.c_int,
         ctypes.POINTER(ctypes.c_double))


def gram(base: Tensor | None, tensors: Sequence[Tensor]) -> Gram | None:
    """⟨δ_i, δ_k⟩ for all i, k, δ_i = tensors[i] − ``base`` (``tensors[i]`` itself when ``base`` is
    None), by the native pass (on the CPU), or None where the kernel is not built or does not take
    these tensors (then :func:`whole_gram` is the way)."""
    fn = native.kernel("gram", "evomerge_gram", _ARGS)
    everything = [*tensors, *([base] if base is not None else [])]
    if fn is None or len(tensors) > _MAX_TENSORS or not native.takes(everything):
        return None
    n = len(tensors)
    out = torch.empty((n, n), dtype=torch.float64)
    status = fn(native.DTYPES[tensors[0].dtype], base.data_ptr() if base is not None else None,
                native.pointers(tensors), n, tensors[0].numel(), native.threads(),
                ctypes.cast(out.data_ptr(), ctypes.POINTER(ctypes.c_double)))
    if status != 0:
        raise ValueError(f"native Gram rejected its arguments ({n} tensors of {tensors[0].numel()} entries)")
    return [list(row) for row in out]


def whole_gram(base: Tensor | None, tensors: Sequence[Tensor]) -> Gram:
    """:func:`gram` by whole-tensor torch ops on the tensors' device (flat tensors of one size):
    each δ formed in the working dtype (float32 for 16-bit sources), widened to float64, and each
    pair's products summed. Each pair forms its δs again: compiled, they are registers of one
    reduction loop; run eagerly, no more than two float64 copies live at once. Separate 0-d sums,
    not a stacked matrix: compiled, the sums share one reduction kernel, where a stack would add
    a copy kernel per entry on a GPU."""
    work = working_dtype(tensors[0].dtype)

    def delta(i: int) -> Tensor:
        x = tensors[i].to(work)
        return (x - base.to(work) if base is not None else x).to(torch.float64)

    n = len(tensors)
    upper = {(i, k): (delta(i) * delta(k)).sum() for i in range(n) for k in range(i, n)}
    return [[upper[min(i, k), max(i, k)] for k in range(n)] for i in range(n)]
