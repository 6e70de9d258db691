"""Inner products of task vectors, ⟨δ_i, δ_k⟩ with δ_i = x_i − θ_b: the cosines of Model Stock and
SLERP, from one pass over the sources and nothing of a tensor's size.

Each entry of δ is formed in float32 (16-bit sources widened first; float64 sources stay
float64), its products are exact in float64 and summed in float64, so a Gram entry carries a
relative error of ~1e-16·√n whichever path computes it. Two paths:

- native (``gram.cpp``): float32 and bfloat16 tensors on the CPU, one pass over all of them
  with the machine's vector unit, fixed blocks summed in order, so the result does not depend
  on the thread count;
- torch, for everything else (GPU tensors, float16, no compiler, ``EVOMERGE_NATIVE=0``): chunk
  by chunk, each chunk's float64 dot products.

The two differ in the order of their float64 sums only, far below what the float32 coefficients
derived from the Gram (a cosine, t) can show: the merges they feed come out the same.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.workers import native
from evomerge.workers.streaming import CHUNK

_NATIVE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_MAX_TENSORS = 16

Gram = list[list[float]]


@functools.cache
def _kernel() -> ctypes.CDLL | None:
    lib = native.library("gram")
    if lib is not None:
        lib.evomerge_gram.restype = ctypes.c_int
        lib.evomerge_gram.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                      ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_double)]
    return lib


def _native_ok(tensors: Sequence[Tensor]) -> bool:
    n, dtype = tensors[0].numel(), tensors[0].dtype
    return (0 < n and dtype in _NATIVE_DTYPES and len(tensors) <= _MAX_TENSORS + 1
            and all(t.device.type == "cpu" and t.is_contiguous() and t.dtype == dtype and t.numel() == n
                    for t in tensors))


def _native_gram(lib: ctypes.CDLL, base: Tensor | None, tensors: Sequence[Tensor]) -> Gram:
    n = len(tensors)
    out = (ctypes.c_double * (n * n))()
    status = lib.evomerge_gram(_NATIVE_DTYPES[tensors[0].dtype], base.data_ptr() if base is not None else None,
                               (ctypes.c_void_p * n)(*[t.data_ptr() for t in tensors]), n, tensors[0].numel(),
                               max(1, torch.get_num_threads()), out)
    if status != 0:
        raise ValueError(f"native Gram rejected its arguments ({n} tensors of {tensors[0].numel()} entries)")
    return [[out[i * n + k] for k in range(n)] for i in range(n)]


def _torch_gram(base: Tensor | None, tensors: Sequence[Tensor]) -> Gram:
    flats = [t.reshape(-1) for t in tensors]
    flat_base = base.reshape(-1) if base is not None else None
    n, numel = len(flats), flats[0].numel()
    work = torch.float64 if flats[0].dtype == torch.float64 else torch.float32
    size = min(CHUNK, numel)
    deltas = [torch.empty(size, dtype=work, device=flats[0].device) for _ in flats]  # reused by every chunk
    wide = [torch.empty(size, dtype=torch.float64, device=flats[0].device) for _ in flats]
    gram = [[0.0] * n for _ in range(n)]
    for start in range(0, numel, CHUNK):
        m = min(CHUNK, numel - start)
        for f, d, w in zip(flats, deltas, wide):
            d[:m].copy_(f[start:start + m])
            if flat_base is not None:
                d[:m].sub_(flat_base[start:start + m].to(work))
            w[:m].copy_(d[:m])
        for i in range(n):
            for k in range(i, n):
                gram[i][k] += float(torch.dot(wide[i][:m], wide[k][:m]))
    for i in range(n):
        for k in range(i):
            gram[i][k] = gram[k][i]
    return gram


def gram(base: Tensor | None, tensors: Sequence[Tensor], native_path: bool = True) -> Gram:
    """⟨δ_i, δ_k⟩ for all i, k, δ_i = tensors[i] − ``base`` (``tensors[i]`` itself when ``base`` is
    None), as nested lists of Python floats. ``native_path`` False: the torch path only."""
    lib = _kernel() if native_path else None
    if lib is not None and _native_ok([*tensors, *([base] if base is not None else [])]):
        return _native_gram(lib, base, tensors)
    return _torch_gram(base, tensors)
