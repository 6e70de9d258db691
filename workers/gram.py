"""Inner products of task vectors, ⟨δ_i, δ_k⟩ with δ_i = x_i − θ_b: the cosines of Model Stock and
SLERP, from one pass over the sources and nothing of a tensor's size.

Each entry of δ is formed in float32 (16-bit sources widened first; float64 sources stay
float64), its products are exact in float64 and summed in float64, so a Gram entry carries a
relative error of ~1e-16·√n whichever path computes it. Two paths:

- native (``gram.cpp``): float32 and bfloat16 tensors on the CPU, one pass over all of them
  with the machine's vector unit, fixed blocks summed in order, so the result does not depend
  on the thread count;
- torch, for everything else (GPU tensors, float16, no compiler, ``EVOMERGE_NATIVE=0``): chunk
  by chunk, the chunk's δs widened into the rows of a float64 matrix W and W·Wᵀ summed.

The two differ in the order of their float64 sums only, far below what the float32 coefficients
derived from the Gram (a cosine, t) can show: the merges they feed come out the same.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.profiler import record_function

from evomerge.workers import native
from evomerge.workers.streaming import CHUNK

DEVICE_CHUNK = 1 << 26  # entries per step of the torch path on a GPU

_MAX_TENSORS = 16
_ARGS = (ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int64, ctypes.c_int,
         ctypes.POINTER(ctypes.c_double))

Gram = list[list[float]]


def _native_gram(fn: Callable[..., int], base: Tensor | None, tensors: Sequence[Tensor]) -> Gram:
    n = len(tensors)
    out = (ctypes.c_double * (n * n))()
    status = fn(native.DTYPES[tensors[0].dtype], base.data_ptr() if base is not None else None,
                native.pointers(tensors), n, tensors[0].numel(), native.threads(), out)
    if status != 0:
        raise ValueError(f"native Gram rejected its arguments ({n} tensors of {tensors[0].numel()} entries)")
    return [[out[i * n + k] for k in range(n)] for i in range(n)]


def _torch_gram(base: Tensor | None, tensors: Sequence[Tensor]) -> Gram:
    """Chunk by chunk: each δ formed in float32 (float64 for float64 tensors), widened into one row
    of a float64 matrix W, and W·Wᵀ added up on the tensors' device (one read back at the end)."""
    flats = [t.reshape(-1) for t in tensors]
    flat_base = base.reshape(-1) if base is not None else None
    n, numel, device = len(flats), flats[0].numel(), flats[0].device
    work = torch.float64 if flats[0].dtype == torch.float64 else torch.float32
    # on a GPU chunks of 2^26 entries (a launch costs there; the float64 rows take 0.5 GB per tensor)
    chunk = CHUNK if device.type == "cpu" else DEVICE_CHUNK
    size = min(chunk, numel)
    delta = torch.empty(size, dtype=work, device=device)  # scratch reused by every chunk
    wide = torch.empty((n, size), dtype=torch.float64, device=device)
    total = torch.zeros((n, n), dtype=torch.float64, device=device)
    for start in range(0, numel, chunk):
        m = min(chunk, numel - start)
        for row, f in zip(wide, flats):
            if flat_base is None:
                row[:m].copy_(f[start:start + m])
            else:
                row[:m].copy_(delta[:m].copy_(f[start:start + m]).sub_(flat_base[start:start + m]))
        block = wide[:, :m]
        total.addmm_(block, block.T)
    with record_function("evomerge.sync"):  # the one read back of the tensor (the host needs the angles)
        upper = total.tolist()
    return [[upper[min(i, k)][max(i, k)] for k in range(n)] for i in range(n)]


def gram(base: Tensor | None, tensors: Sequence[Tensor], native_path: bool = True) -> Gram:
    """⟨δ_i, δ_k⟩ for all i, k, δ_i = tensors[i] − ``base`` (``tensors[i]`` itself when ``base`` is
    None), as nested lists of Python floats. ``native_path`` False: the torch path only."""
    fn = native.kernel("gram", "evomerge_gram", _ARGS) if native_path else None
    if fn is not None and len(tensors) <= _MAX_TENSORS and native.takes([*tensors, *([base] if base is not None else [])]):
        return _native_gram(fn, base, tensors)
    return _torch_gram(base, tensors)
