"""What a controller does with the work of a controller that stopped (killed, signalled, or
cut off from the database), and with its own on an orderly stop: no trial stays RUNNING, no
attempt stays open, and every candidate that was in flight is queued again (or failed, when
it keeps killing controllers). Also the study's first candidates: its baselines."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from evomerge.search.config import SearchConfig
from evomerge.search.ledger import Ledger
from evomerge.search.spaces import Space
from evomerge.storage.kinds import Split, State
from evomerge.storage.repository import CandidateRecord, Repository

Values = Callable[[CandidateRecord], "tuple[float, ...] | None"]


def requeue_running(repo: Repository, ledger: Ledger, study_id: int, values: Values, max_attempts: int,
                    give_up_after_max: bool) -> None:
    """Fail every RUNNING trial and put every running candidate back in the queue.

    The database, not the pool, says what is running: a result already taken from a worker
    but not yet recorded is re-queued too. ``give_up_after_max`` fails candidates whose
    attempts are spent (a candidate that keeps killing controllers). ``values`` gives what a
    completed candidate's trial records (its row, written first, is the truth).
    """
    cands = repo.candidates(study_id)
    by_trial = {c.trial_number: c for c in cands if c.trial_number is not None}
    ledger.settle_running(lambda number: _verdict(by_trial.get(number), values))
    repo.end_open_attempts(study_id, Split.HELDOUT, "abandoned: controller stopped")
    for cand in (c for c in cands if c.state == State.RUNNING):
        repo.end_attempt(cand.id, Split.SEARCH, cand.worker, "abandoned: controller stopped")
        spent = repo.spent_attempts(cand.id, Split.SEARCH)
        if give_up_after_max and spent >= max_attempts:
            repo.fail(cand.id, f"abandoned after {spent} attempts")
        else:
            repo.requeue(cand.id, "controller stopped during evaluation")


def _verdict(cand: CandidateRecord | None, values: Values) -> Sequence[float] | str:
    """What a RUNNING trial becomes."""
    done = values(cand) if cand is not None else None
    if done is not None:
        return done
    if cand is not None and cand.state == State.FAILED:
        return cand.error or "failed"
    return "controller stopped while this trial ran; its candidate was re-queued"


def seed_baselines(repo: Repository, study_id: int, cfg: SearchConfig, space: Space) -> None:
    """A new study's baselines (the space's), queued before any proposal."""
    if repo.candidates(study_id):
        return
    o = cfg.optimizer
    for origin, recipe in space.baselines([m.name for m in cfg.models], o.init, o.start == "best_baseline"):
        repo.add_candidate(study_id, recipe.to_json(), recipe.content_hash, origin)
