"""Which candidates are baselines and which the optimizer proposed: a rule of the search.

Storage records a candidate's origin (storage/kinds.py); what an origin means for the
search is decided here. Baselines (each source model as itself, untuned merges) are scored
and shown apart on the leaderboard; they are told to the optimizer only as priors, and are
always re-scored on the held-out split.
"""

from __future__ import annotations

from evomerge.storage.kinds import Origin
from evomerge.storage.records import CandidateRecord

BASELINE_ORIGINS: frozenset[Origin] = frozenset({Origin.SOURCE, Origin.UNTUNED})


def evolved(cand: CandidateRecord) -> bool:
    """Proposed by the optimizer (its origin is the optimizer's name), not a baseline."""
    return cand.origin not in BASELINE_ORIGINS
