"""What a running search reports to whoever watches it, and nothing more.

The controller emits a few events; the application (``evomerge.search.app``) turns them into
a progress display, the dashboard's notes and figures, and experiment tracking. The commands
build those observers and hand them to the controller, so the core names none of them and
imports nothing of rich, plotly, optuna-dashboard or MLflow.

Every event comes after the fact it reports is stored (in our tables and in the Optuna
ledger): an observer reads, never steers, and a stop between a fact and its event loses only
what the observer would have shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from evomerge.storage.repository import CandidateRecord


@dataclass(frozen=True)
class LoopState:
    """The search loop's state after each wait for results (about every heartbeat)."""

    done: int  # candidates finished, counting earlier runs of the study
    best: float | None  # best search fitness so far
    busy: int  # workers with a job
    workers: int  # workers in the pool


class SearchObserver(Protocol):
    """Events of one controller's study; each observer implements all of them
    (:class:`QuietObserver` is a base whose events do nothing)."""

    def searching(self, state: LoopState) -> None:
        """The loop went round: the first call means the workers are up."""

    def finished(self, cand: CandidateRecord) -> None:
        """A candidate completed or failed (a duplicate settled by its twin included), as stored;
        its trial is already told."""

    def heldout_scored(self, cand: CandidateRecord) -> None:
        """A candidate was re-scored on the held-out split (``cand.heldout`` is set)."""

    def phase_ended(self, cands: Sequence[CandidateRecord]) -> None:
        """The search or the held-out re-scoring stopped (done, out of time or signalled);
        ``cands`` is every candidate of the study as stored."""


class QuietObserver:
    """An observer that ignores every event: subclass it and override the events you watch."""

    def searching(self, state: LoopState) -> None:
        pass

    def finished(self, cand: CandidateRecord) -> None:
        pass

    def heldout_scored(self, cand: CandidateRecord) -> None:
        pass

    def phase_ended(self, cands: Sequence[CandidateRecord]) -> None:
        pass


class Observers:
    """Fan-out: one event to every observer, in order. An observer's error propagates (each
    decides for itself whether a failure of its backend may stop the search)."""

    def __init__(self, observers: Sequence[SearchObserver] = ()) -> None:
        self.observers = tuple(observers)

    def searching(self, state: LoopState) -> None:
        for o in self.observers:
            o.searching(state)

    def finished(self, cand: CandidateRecord) -> None:
        for o in self.observers:
            o.finished(cand)

    def heldout_scored(self, cand: CandidateRecord) -> None:
        for o in self.observers:
            o.heldout_scored(cand)

    def phase_ended(self, cands: Sequence[CandidateRecord]) -> None:
        for o in self.observers:
            o.phase_ended(cands)
