"""Every optimizer survives ``kill -9`` of the controller: the same command resumes the
search to its budget, and the rebuilt optimizer is a function of the stored trials."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from evomerge.search.optimizers import OPTIMIZERS
from tests.test_search_e2e import demo_config, evomerge, query, rebuilt_proposal, start_and_wait_for_progress

pytestmark = pytest.mark.usefixtures("joined_ray")  # its `evomerge` subprocesses join one shared Ray


# CMA-ES's kill -9 and resume is tests/test_search_e2e.py::test_kill_9_mid_search_then_resume.
@pytest.mark.parametrize("name", sorted(set(OPTIMIZERS) - {"cma"}))
def test_kill_9_then_resume_for_every_optimizer(tmp_path: Path, name: str) -> None:
    budget = 16
    cfg = demo_config(tmp_path / "o.yaml", max_trials=budget, limit=20, optimizer={"name": name, "popsize": 4})
    db = tmp_path / "o.db"
    proc = start_and_wait_for_progress(cfg, db, tmp_path, done_at_least=7)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert query(db, "select count(*) from evomerge_candidates where state='running'")[0][0] >= 1

    first = rebuilt_proposal(cfg, db)
    assert rebuilt_proposal(cfg, db) == first  # the state is a function of what was stored

    evomerge("search", str(cfg), "--storage", f"sqlite:///{db}", "--workers", "2", cwd=tmp_path)
    states = dict(query(db, "select state, count(*) from evomerge_candidates group by state"))
    assert states.get("running", 0) == 0 and states.get("queued", 0) == 0
    assert states.get("complete", 0) + states.get("failed", 0) == budget
    assert query(db, "select count(*) from trials where state='RUNNING'") == [(0,)]
    origins = {o for (o,) in query(db, "select distinct origin from evomerge_candidates")}
    assert origins == {"source", "untuned", name}  # the optimizer's name marks what it proposed
