"""The same search and resume on PostgreSQL (started by .ci/run on loopback).

Set EVOMERGE_TEST_POSTGRES_URL (password in PGPASSWORD) to run it; `.ci/postgres.sh`
starts a throwaway server and prints those exports.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.helpers import run_evomerge, write_config

URL = os.environ.get("EVOMERGE_TEST_POSTGRES_URL")
pytestmark = [pytest.mark.skipif(not URL, reason="EVOMERGE_TEST_POSTGRES_URL not set (see .ci/postgres.sh)"),
              pytest.mark.usefixtures("joined_ray")]  # its `evomerge` subprocesses join one shared Ray


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = run_evomerge(*args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_search_resume_status_on_postgres(tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path) -> None:
    assert URL is not None
    study = f"pg-{uuid.uuid4().hex[:8]}"
    cfg = write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a", "b")}, tiny_tasks,
                       budget={"max_trials": 9})
    _cli("search", str(cfg), "--storage", URL, "--study", study, cwd=tmp_path)
    _cli("search", str(cfg), "--storage", URL, "--study", study, "--max-trials", "13", cwd=tmp_path)
    board = json.loads(_cli("status", "--storage", URL, "--study", study, "--json", cwd=tmp_path).stdout)
    assert board["done"] == 13 and board["running"] == 0 and board["queued"] == 0
    assert any(r["heldout"] is not None for r in board["rows"] + board["baselines"])
    from sqlalchemy import create_engine, text

    engine = create_engine(URL)
    with engine.connect() as conn:
        states = dict(conn.execute(text(
            "select t.state, count(*) from trials t join studies s on s.study_id = t.study_id "
            "where s.study_name = :n group by t.state"), {"n": study}).fetchall())
    engine.dispose()
    assert {str(k).split(".")[-1]: v for k, v in states.items()} == {"COMPLETE": 13}
    out = tmp_path / "model"
    _cli("replay", "--storage", URL, "--study", study, "--out", str(out), cwd=tmp_path)
    assert (out / "model.safetensors").is_file()
    # The password never appears in what a user sees.
    status = _cli("status", "--storage", URL, "--study", study, cwd=tmp_path)
    assert os.environ.get("PGPASSWORD", "\0") not in status.stdout + status.stderr
