"""Database faults around a running search: a stop between the two ledgers' writes, PostgreSQL
stopped or restarted under the controller (real pg_ctl), an outside SQLite write lock.

After each, our candidate table and the Optuna trials agree: no RUNNING trial, and every
candidate that completed has its trial COMPLETE with the stored fitness.
"""

from __future__ import annotations

import glob
import os
import re
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.cli_fork import Running
from tests.helpers import start_evomerge, write_config

PG_URL = os.environ.get("EVOMERGE_TEST_POSTGRES_URL")
PG_DATA = os.environ.get("EVOMERGE_TEST_PG_DATA")
needs_pg_ctl = pytest.mark.skipif(
    not (PG_URL and PG_DATA and os.geteuid() == 0),
    reason="needs the throwaway server of .ci/postgres.sh (EVOMERGE_TEST_POSTGRES_URL, EVOMERGE_TEST_PG_DATA) and root")

pytestmark = pytest.mark.usefixtures("joined_ray")  # its `evomerge` subprocesses join one shared Ray


def test_resume_settles_trials_as_the_candidate_table_says(tmp_path: Path, tiny_models: dict[str, Path],
                                                          tiny_tasks: Path) -> None:
    """A controller killed between recording an outcome in our table and telling Optuna:
    before, resume failed the trial of a candidate that had completed."""
    from optuna.trial import TrialState

    from tests.test_failures import _controller

    cfg = write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a", "b")}, tiny_tasks)
    controller, repo, study_id = _controller(cfg, tmp_path / "r.db")
    ledger = controller.ledger
    models = [m.name for m in controller.cfg.models]
    recipes = controller.space.baselines(models, controller.cfg.optimizer.init, leave_one_out=False)[:3]
    ids = [repo.add_candidate(study_id, r.to_json(), r.content_hash, origin) for origin, r in recipes]
    numbers = [ledger.open_trial({}, {}, {"candidate_id": cid}) for cid in ids]
    for cid, number in zip(ids, numbers):
        repo.start_attempt(cid, number, "search")
    # The state a kill between the two writes leaves: our rows settled, Optuna's trials RUNNING.
    repo.end_attempt(ids[0], "search", "w0", "ok")
    repo.complete(ids[0], scores={"tiny_add": 0.5, "tiny_sub": 0.25}, fitness=0.375, worker="w0", materialize_s=0.1,
                  evaluate_s=0.2)
    repo.end_attempt(ids[1], "search", "w1", "materialize: boom")
    repo.fail(ids[1], "materialize: boom", "w1")
    # ids[2] was still being evaluated.

    summary = controller.run(2, None)  # two done already: recovery only, no worker starts
    assert summary.done == 2
    trials = {t.number: t for t in ledger.study.get_trials()}
    assert trials[numbers[0]].state == TrialState.COMPLETE and trials[numbers[0]].value == 0.375
    assert trials[numbers[1]].state == TrialState.FAIL
    assert trials[numbers[1]].user_attrs["fail_reason"] == "materialize: boom"
    assert trials[numbers[2]].state == TrialState.FAIL
    assert [repo.candidate(c).state for c in ids] == ["complete", "failed", "queued"]


# --- real outages under a running search ---------------------------------------------------


def _search(cfg: Path, url: str, study: str, cwd: Path, patience: float | None = None,
            max_trials: int | None = None) -> Running:
    env = {"EVOMERGE_DB_PATIENCE_S": str(patience)} if patience is not None else {}
    args = ["search", str(cfg), "--storage", url, "--study", study]
    if max_trials is not None:
        args += ["--max-trials", str(max_trials)]
    return start_evomerge(*args, cwd=cwd, text=True, **env)


def _rows(url: str, study: str) -> tuple[list[tuple[int | None, str, float | None]], dict[int, tuple[str, float | None]]]:
    """Our candidates (trial number, state, fitness) and Optuna's trials (number -> state, value)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            cands = [tuple(r) for r in conn.execute(text(
                "select c.trial_number, c.state, c.fitness from evomerge_candidates c join evomerge_studies s "
                "on s.id = c.study_id where s.name = :n"), {"n": study})]
            trials = {int(r[0]): (str(r[1]).split(".")[-1], r[2]) for r in conn.execute(text(
                "select t.number, t.state, v.value from trials t join studies s on s.study_id = t.study_id "
                "left join trial_values v on v.trial_id = t.trial_id where s.study_name = :n"), {"n": study})}
    finally:
        engine.dispose()
    return cands, trials  # type: ignore[return-value]


def _done(url: str, study: str) -> int:
    try:
        return sum(1 for _, state, _ in _rows(url, study)[0] if state in ("complete", "failed"))
    except Exception:
        return 0  # tables not there yet


def _wait_done(proc: Running, url: str, study: str, at_least: int) -> int:
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        done = _done(url, study)
        if done >= at_least:
            return done
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"search stopped or made no progress (exit {proc.poll()}): {proc.communicate()[1][-2000:]}")


def assert_ledgers_agree(url: str, study: str) -> None:
    cands, trials = _rows(url, study)
    assert all(state != "RUNNING" for state, _ in trials.values())
    assert all(state != "running" for _, state, _ in cands)
    for number, state, fitness in cands:
        if state == "complete":
            assert number is not None and trials[number] == ("COMPLETE", pytest.approx(fitness)), number
    assert sum(state == "COMPLETE" for state, _ in trials.values()) == sum(s == "complete" for _, s, _ in cands)


def _pg_ctl(action: str) -> None:
    assert PG_URL and PG_DATA
    bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))[-1]
    cmd = ["runuser", "-u", "postgres", "--", f"{bindir}/pg_ctl", "-D", PG_DATA, "-w", "-m", "fast"]
    if action == "start":
        port = make_url(PG_URL).port
        cmd += ["-l", f"{PG_DATA}/server.log", "-o", f"-p {port} -k {PG_DATA} -c listen_addresses=127.0.0.1"]
    subprocess.run([*cmd, action], check=True, capture_output=True, timeout=120)


@pytest.fixture()
def pg_restored():  # type: ignore[no-untyped-def]
    """Whatever a test does to the server, it is running again afterwards."""
    yield
    probe = subprocess.run(["runuser", "-u", "postgres", "--", "pg_isready", "-h", "127.0.0.1",
                            "-p", str(make_url(PG_URL).port)], capture_output=True)  # type: ignore[arg-type]
    if probe.returncode != 0:
        _pg_ctl("start")


def _pg_config(tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path) -> Path:
    return write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a", "b")}, tiny_tasks,
                        budget={"max_trials": 40})


@needs_pg_ctl
def test_postgres_restart_under_a_running_search(tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path,
                                                 pg_restored: None) -> None:
    """Before: the controller ended within 5 s with "StorageInternalError ... exceeding max
    length", and a completed candidate's trial was FAIL."""
    assert PG_URL is not None
    study = f"restart-{uuid.uuid4().hex[:8]}"
    proc = _search(_pg_config(tmp_path, tiny_models, tiny_tasks), PG_URL, study, tmp_path)
    _wait_done(proc, PG_URL, study, 8)
    _pg_ctl("stop")
    time.sleep(1.5)
    _pg_ctl("start")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert _done(PG_URL, study) == 40
    assert_ledgers_agree(PG_URL, study)


@needs_pg_ctl
def test_postgres_down_past_the_patience_stops_with_one_line(tmp_path: Path, tiny_models: dict[str, Path],
                                                             tiny_tasks: Path, pg_restored: None) -> None:
    assert PG_URL is not None
    study = f"down-{uuid.uuid4().hex[:8]}"
    cfg = _pg_config(tmp_path, tiny_models, tiny_tasks)
    proc = _search(cfg, PG_URL, study, tmp_path, patience=5)
    _wait_done(proc, PG_URL, study, 8)
    _pg_ctl("stop")
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        _pg_ctl("start")
    lines = [line for line in err.splitlines() if line.startswith("evomerge: error")]
    assert proc.returncode == 1 and len(lines) == 1, err[-3000:]
    assert f"database unreachable at {make_url(PG_URL).render_as_string(hide_password=True)}" in lines[0]
    assert "Traceback" not in err and "StorageInternalError" not in err
    assert os.environ.get("PGPASSWORD", "\0") not in err
    # The same command resumes (for two more trials: what resuming shows needs no more); the
    # ledgers are reconciled.
    more = _done(PG_URL, study) + 2
    resumed = _search(cfg, PG_URL, study, tmp_path, max_trials=more)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert _done(PG_URL, study) == more
    assert_ledgers_agree(PG_URL, study)


PATIENCE_S = 6  # a statement's busy wait is then 1.5 s (patience / 4)


def test_outside_sqlite_write_lock(tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path) -> None:
    """A lock shorter than the patience is waited out; a longer one stops the search with one
    line ("database locked for N s"), and the same command resumes. Before: the run ended
    with a bare "database is locked" after 60 s, and never gave up on a shorter lock. The
    patience is the run's setting (the 120 s default would make this test wait minutes)."""
    db = tmp_path / "s.db"
    url = f"sqlite:///{db}"
    cfg = write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a", "b")}, tiny_tasks,
                       budget={"max_trials": 400})
    proc = _search(cfg, url, "t", tmp_path, patience=PATIENCE_S)
    done = _wait_done(proc, url, "t", 6)
    outside = sqlite3.connect(db, timeout=60, isolation_level=None)
    try:
        outside.execute("BEGIN IMMEDIATE")
        time.sleep(PATIENCE_S / 2)  # longer than a statement's busy wait (patience / 4), shorter than the patience
        outside.execute("COMMIT")
        _wait_done(proc, url, "t", done + 3)
        outside.execute("BEGIN IMMEDIATE")
        _, err = proc.communicate(timeout=300)
        outside.execute("COMMIT")
    finally:
        outside.close()
    lines = [line for line in err.splitlines() if line.startswith("evomerge: error")]
    assert proc.returncode == 1 and len(lines) == 1, err[-3000:]
    # N is at least the patience; by how much it overshoots depends on the machine's load (the
    # last attempt's busy wait ends after the patience): once 10 s on a loaded CI machine.
    waited = re.search(r"database locked for (\d+) s at ", lines[0])
    assert waited is not None and PATIENCE_S <= int(waited.group(1)) <= 60 and str(db) in lines[0], lines[0]
    resumed = _search(cfg, url, "t", tmp_path, max_trials=_done(url, "t") + 2)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert_ledgers_agree(url, "t")
