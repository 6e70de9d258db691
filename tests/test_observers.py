"""The controller's observers (search/observers.py): the fan-out hands every event to every
observer in order, and the application's observers fit the protocol."""

from __future__ import annotations

from collections.abc import Sequence

from evomerge.search.app.dashboard import DashboardObserver
from evomerge.search.app.progress import Progress
from evomerge.search.app.tracking import MlflowTracker
from evomerge.search.observers import LoopState, Observers, QuietObserver, SearchObserver
from evomerge.storage.repository import CandidateRecord


class Recorder(QuietObserver):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def searching(self, state: LoopState) -> None:
        self.log.append(f"{self.name} searching {state.done}")

    def phase_ended(self, cands: Sequence[CandidateRecord]) -> None:
        self.log.append(f"{self.name} phase_ended {len(cands)}")


def test_fan_out_calls_every_observer_in_order() -> None:
    log: list[str] = []
    fan = Observers([Recorder("a", log), Recorder("b", log)])
    fan.searching(LoopState(done=3, best=0.5, busy=1, workers=2))
    fan.phase_ended([])
    assert log == ["a searching 3", "b searching 3", "a phase_ended 0", "b phase_ended 0"]


def test_application_observers_implement_every_event() -> None:
    events = [name for name in vars(SearchObserver) if not name.startswith("_")]
    assert sorted(events) == ["finished", "heldout_scored", "phase_ended", "searching"]
    for cls in (QuietObserver, Observers, Progress, DashboardObserver, MlflowTracker):
        assert all(callable(getattr(cls, e, None)) for e in events), cls
