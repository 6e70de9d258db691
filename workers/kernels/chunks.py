"""How many entries a streaming pass takes per step: the one size the eager chunk loop
(:mod:`workers.streaming`) and the uncompiled fused merge (:mod:`workers.fused`) share."""

from __future__ import annotations

import torch

CHUNK = 1 << 18  # elements per step (per thread): larger than L2, inside L3; 2^17 was ~10 % slower, 2^16 ~40 %


def chunk_size(device: torch.device | None = None) -> int:
    """Elements per chunk: more with more threads, so each op still splits across them. On a GPU
    a chunk is a whole tensor of up to 2^28 entries: a launch costs microseconds there, and a
    chunk loop multiplies them (the scratch, ~8 buffers of a chunk, stays within a few GiB)."""
    if device is not None and device.type != "cpu":
        return 1 << 28
    return CHUNK * max(1, min(8, torch.get_num_threads()))
