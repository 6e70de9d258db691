"""Schema versions: a new database is stamped, one written by evomerge 0.1.0 (the release
before schema versions; tests/data/evomerge-0.1.0.db, made by that release's own code from
tests/data/evomerge-0.1.0.yaml) is upgraded and a search resumes on it, and a database newer
than the code is refused with one line."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from evomerge.storage.migrations import SCHEMA_VERSION, SchemaTooNew
from evomerge.storage.repository import Repository
from tests.helpers import DEMO, ROOT

DATA = ROOT / "tests" / "data"
# The 0.1.0 database stores the absolute model and task paths its search was started with;
# a resumed search must name the same ones, so they are laid out there again.
FIXTURE_HOME = Path("/tmp/evomerge-fixture-0.1.0")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "evomerge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def _version(db: Path) -> list[tuple[int]]:
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "evomerge_schema_version" not in tables:
            return []
        return conn.execute("SELECT version FROM evomerge_schema_version").fetchall()


def _old_db(tmp_path: Path) -> Path:
    db = tmp_path / "old.db"
    shutil.copy(DATA / "evomerge-0.1.0.db", db)
    return db


def test_new_database_is_stamped_with_the_current_version(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    Repository(f"sqlite:///{db}").close()
    assert _version(db) == [(SCHEMA_VERSION,)]


def test_previous_release_database_is_upgraded_and_a_search_resumes(tmp_path: Path) -> None:
    db = _old_db(tmp_path)
    assert _version(db) == []  # 0.1.0 wrote no schema version
    with sqlite3.connect(db) as conn:
        before = conn.execute("SELECT id, trial_number, recipe_hash, fitness FROM evomerge_candidates "
                              "ORDER BY id").fetchall()
    assert len(before) == 10

    status = _cli("status", "--storage", f"sqlite:///{db}", "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["done"] == 10

    for part in ("models", "tasks"):
        shutil.copytree(DEMO / part, FIXTURE_HOME / part, dirs_exist_ok=True)
    shutil.copy(DATA / "evomerge-0.1.0.yaml", FIXTURE_HOME / "search.yaml")
    run = _cli("search", str(FIXTURE_HOME / "search.yaml"), "--storage", f"sqlite:///{db}", "--study", "prev",
               "--max-trials", "13", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "10/13 trials done before this run" in run.stderr

    assert _version(db) == [(SCHEMA_VERSION,)]
    with sqlite3.connect(db) as conn:
        after = conn.execute("SELECT id, trial_number, recipe_hash, fitness FROM evomerge_candidates "
                             "ORDER BY id").fetchall()
        finished = conn.execute("SELECT count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
                                "WHERE s.study_name = 'prev' AND t.state = 'COMPLETE'").fetchone()[0]
    assert after[:10] == before  # the old candidates kept, numbers and scores unchanged
    assert len(after) >= 13 and finished >= 13


def test_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    db = _old_db(tmp_path)
    Repository(f"sqlite:///{db}").close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE evomerge_schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    try:
        Repository(f"sqlite:///{db}")
    except SchemaTooNew as exc:
        assert f"version {SCHEMA_VERSION + 1}" in str(exc)
    else:
        raise AssertionError("a newer schema was accepted")
    proc = _cli("status", "--storage", f"sqlite:///{db}", cwd=tmp_path)
    assert proc.returncode == 2
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        f"evomerge: error: the database's schema is version {SCHEMA_VERSION + 1}, newer than this evomerge's "
        f"({SCHEMA_VERSION}): upgrade evomerge to read or write it"]
