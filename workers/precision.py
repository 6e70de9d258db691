"""The working dtype of a merge: 16-bit sources are merged in float32 and rounded once when
stored (merge arithmetic 2, :mod:`workers.arithmetic`). The one place that says which dtypes
those are; the merge modules import it (it imports none of them)."""

from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)  # merged in float32, rounded once


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a merge computes in: float32 for 16-bit sources, rounded once when stored."""
    return torch.float32 if dtype in HALF else dtype
