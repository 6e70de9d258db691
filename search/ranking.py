"""Which candidate is best: the one rule the controller, the PS+DFS staging and every report share."""

from __future__ import annotations

from collections.abc import Iterable

from evomerge.storage.kinds import State
from evomerge.storage.repository import CandidateRecord


def best_candidate(cands: Iterable[CandidateRecord]) -> CandidateRecord | None:
    """The best completed candidate by search fitness (the earliest on a tie), or None."""
    done = [c for c in cands if c.state == State.COMPLETE and c.fitness is not None]
    return max(done, key=lambda c: (c.fitness, -c.id)) if done else None
