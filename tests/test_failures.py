"""Failures in the middle of a search: a worker killed, scores that are not numbers."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from evomerge.search.app.commands import prepare
from evomerge.search.config import load_config
from evomerge.search.controller import Controller
from evomerge.search.ledger import Ledger
from evomerge.workers.pool import WorkerPool
from evomerge.storage.kinds import Split
from evomerge.storage.repository import Repository
from tests.helpers import write_config
from evomerge.workers.worker_spec import WorkerSpec


def _controller(cfg_path: Path, db: Path) -> tuple[Controller, Repository, int]:
    cfg = load_config(cfg_path)
    prep = prepare(cfg)
    url = f"sqlite:///{db}"
    repo = Repository(url)
    study = repo.create_study(cfg.study, cfg.model_dump_json())
    spec = WorkerSpec(prep.folders, cfg.base_model, cfg.suite())
    controller = Controller(cfg, repo, Ledger(url, cfg.study), prep.space,
                            lambda: WorkerPool(spec, cfg.workers.count, 1, 0, job_timeout_s=cfg.workers.job_timeout_s),
                            study.id)
    return controller, repo, study.id


def test_killed_worker_is_replaced_and_its_job_retried(tmp_path: Path, tiny_models: dict[str, Path],
                                                       tiny_tasks: Path, ray_session: None) -> None:
    import ray

    cfg = write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a", "b")}, tiny_tasks,
                       budget={"max_trials": 14}, workers={"count": 2, "max_attempts": 3})
    controller, repo, study_id = _controller(cfg, tmp_path / "k.db")
    killed: list[str] = []

    def killer() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            pool = controller.pool
            done = sum(1 for c in repo.candidates(study_id) if c.state == "complete")
            refs = list(pool.slots[0].jobs) if pool is not None else []
            # The pool forgets a job only when the controller collects it; a finished one may
            # still be listed, and killing its actor then retries nothing. Kill while one runs.
            if done >= 3 and refs and ray.wait(refs, num_returns=len(refs), timeout=0)[1]:
                ray.kill(pool.slots[0].actor, no_restart=True)
                killed.append("yes")
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = controller.run(14, None)
    thread.join()
    controller.close()
    assert killed and summary.done == 14
    cands = repo.candidates(study_id)
    assert all(c.state == "complete" for c in cands)
    retried = [c for c in cands if c.attempt > 1]
    assert retried, "the killed worker's job was not retried"
    for cand in retried:
        attempts = [a for a in repo.attempts(cand.id) if a.split == Split.SEARCH]
        # The job that ran ended "worker died"; one queued behind it too, recorded as never run.
        assert attempts[-1].outcome == "ok" and attempts[-1].ran
        assert any((a.outcome or "").startswith("worker died") for a in attempts[:-1])
    with sqlite3.connect(tmp_path / "k.db") as conn:
        states = dict(conn.execute("select state, count(*) from trials group by state").fetchall())
        reasons = [json.loads(v) for (v,) in conn.execute(
            "select value_json from trial_user_attributes where key='fail_reason'")]
    assert states.get("RUNNING", 0) == 0 and states["COMPLETE"] == 14 and states["FAIL"] == len(reasons) >= 1
    assert all("re-queued" in r for r in reasons)
