"""The merge arithmetic version: what a stored study's merges were computed with.

A replay must give the model the search scored, so a study records the arithmetic its merges
used, and a replay (or a resumed search) under another version says so in one line instead of
silently writing a different model. Torch-free: the CLI and storage read it.

Versions:

1. 16-bit sources (bfloat16, float16) merged in their own dtype, except sums accumulated in
   float32 (evomerge <= 0.17; studies stored without a version).
2. 16-bit sources merged as the float32 merge of the exactly widened sources, rounded once when
   stored: ``merge(x16) == merge(x16.float()).to(dtype)`` bit for bit, for every operator and
   path (tests/test_merge_arithmetic.py). Task vectors and magnitude cuts are float32, so a
   bfloat16 TIES keeps the entries a float32 one keeps. float32 merges are those of version 1.
"""

from __future__ import annotations

from dataclasses import dataclass

MERGE_ARITHMETIC = 2
SIXTEEN_BIT = ("bfloat16", "float16")  # the dtypes whose merges changed between versions 1 and 2


@dataclass(frozen=True)
class ArithmeticMismatch:
    """A study searched under ``stored`` whose merges this code computes differently."""

    study: str
    stored: int
    dtype: str

    def line(self, action: str) -> str:
        return (f"study {self.study!r} was searched with merge arithmetic {self.stored} ({self.dtype} sources); "
                f"this evomerge merges with arithmetic {MERGE_ARITHMETIC}, so {action}")


def mismatch(study: str, stored: int | None, dtype: str) -> ArithmeticMismatch | None:
    """The mismatch of a study stored with arithmetic ``stored`` (None: before versions were
    recorded, i.e. 1) and sources in ``dtype``, or None when this code merges it the same way."""
    version = 1 if stored is None else stored
    if version == MERGE_ARITHMETIC or (dtype not in SIXTEEN_BIT and {version, MERGE_ARITHMETIC} <= {1, 2}):
        return None
    return ArithmeticMismatch(study, version, dtype)
