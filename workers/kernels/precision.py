"""The working dtype of a merge: 16-bit sources are merged in float32 and rounded once when
stored (merge arithmetic 2, :mod:`workers.arithmetic`). The one place that says which dtypes
those are; the merge modules import it (it imports none of them)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

HALF = (torch.float16, torch.bfloat16)  # merged in float32, rounded once


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a merge computes in: float32 for 16-bit sources, rounded once when stored."""
    return torch.float32 if dtype in HALF else dtype


def widened(base: Tensor, experts: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """The sources in the working dtype (exact: a 16-bit value widens to float32 without rounding;
    float32 sources are returned as they are)."""
    dtype = working_dtype(base.dtype)
    return base.to(dtype), [e.to(dtype) for e in experts]
