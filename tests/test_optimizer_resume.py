"""Every optimizer survives ``kill -9`` of the controller: the same command resumes the
search to its budget, and the rebuilt optimizer is a function of the stored trials."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from search.commands import objectives, prepare
from search.config import load_config
from search.controller import Controller
from search.ledger import Ledger
from search.optimizers import OPTIMIZERS
from storage.repository import Repository
from tests.test_search_e2e import demo_config, evomerge, query, start_and_wait_for_progress


def _rebuilt_proposal(cfg_path: Path, db: Path) -> tuple[float, ...]:
    """Rebuild the study's optimizer from the database alone and ask it for a genome."""
    cfg = load_config(cfg_path)
    url = f"sqlite:///{db}"
    repo = Repository(url)
    record = repo.get_study(cfg.study)
    assert record is not None

    def no_workers() -> None:
        raise AssertionError("rebuilding the optimizer must not start workers")

    controller = Controller(cfg, repo, Ledger(url, cfg.study, objectives(cfg)), prepare(cfg).space,
                            no_workers, record.id)  # type: ignore[arg-type]
    controller._rebuild_optimizer(repo.candidates(record.id))
    assert controller.optimizer is not None and controller.optimizer.name == cfg.optimizer.name
    return controller.optimizer.ask().x


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_kill_9_then_resume_for_every_optimizer(tmp_path: Path, name: str) -> None:
    budget = 22
    cfg = demo_config(tmp_path / "o.yaml", max_trials=budget, limit=30, optimizer={"name": name, "popsize": 4})
    db = tmp_path / "o.db"
    proc = start_and_wait_for_progress(cfg, db, tmp_path, done_at_least=9)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert query(db, "select count(*) from evomerge_candidates where state='running'")[0][0] >= 1

    first = _rebuilt_proposal(cfg, db)
    assert _rebuilt_proposal(cfg, db) == first  # the state is a function of what was stored

    evomerge("search", str(cfg), "--storage", f"sqlite:///{db}", "--workers", "2", cwd=tmp_path)
    states = dict(query(db, "select state, count(*) from evomerge_candidates group by state"))
    assert states.get("running", 0) == 0 and states.get("queued", 0) == 0
    assert states.get("complete", 0) + states.get("failed", 0) == budget
    assert query(db, "select count(*) from trials where state='RUNNING'") == [(0,)]
    origins = {o for (o,) in query(db, "select distinct origin from evomerge_candidates")}
    assert origins == {"source", "untuned", name}  # the optimizer's name marks what it proposed
