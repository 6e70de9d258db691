"""Schema revisions (alembic, version table ``evomerge_alembic_version``): a new database is
made at the head; databases of the hand-written runner that came before are stamped at their
revision and upgraded: one of evomerge 0.1.0 (no version; tests/data/evomerge-0.1.0.db, made by
that release's own code from tests/data/evomerge-0.1.0.yaml) and one at the runner's last
version, 4 (tests/data/evomerge-schema4.db: the 0.1.0 database resumed to 12 trials by the
code of commit 7747ac5), and a search resumes on each. The upgraded schema is the one
storage/tables.py declares, on SQLite and PostgreSQL; a database newer than the code is
refused with one line."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, text
from sqlalchemy.engine import make_url

from evomerge.storage.migrations import SCHEMA_VERSION, VERSION_TABLE, SchemaTooNew, alembic_config, upgrade
from evomerge.storage.repository import Repository
from evomerge.storage.tables import Base
from tests.helpers import DEMO, ROOT, cli_env, run_evomerge

DATA = ROOT / "tests" / "data"
PG_URL = os.environ.get("EVOMERGE_TEST_POSTGRES_URL")
# The 0.1.0 database stores the absolute model and task paths its search was started with;
# a resumed search must name the same ones, so they are laid out there again.
FIXTURE_HOME = Path("/tmp/evomerge-fixture-0.1.0")
CHECKS = {"evomerge_candidates": {"ck_evomerge_candidates_origin", "ck_evomerge_candidates_state"},
          "evomerge_attempts": {"ck_evomerge_attempts_split"}}

pytestmark = pytest.mark.usefixtures("joined_ray")  # its `evomerge` subprocesses join one shared Ray


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_evomerge(*args, cwd=cwd)


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def _versions(db: Path) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """(alembic's revision rows, the old runner's version rows)."""
    tables = {r[0] for r in _rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    return (_rows(db, f"SELECT version_num FROM {VERSION_TABLE}") if VERSION_TABLE in tables else [],
            _rows(db, "SELECT version FROM evomerge_schema_version") if "evomerge_schema_version" in tables else [])


def assert_schema_is_declared(engine: Engine) -> None:
    """Our tables in the database are those of storage/tables.py: columns, types, nullability,
    indexes (alembic's comparison), and the CHECK constraints of the enum columns."""

    def ours(name: str | None, kind: str, _parent: object) -> bool:
        return kind != "table" or (name or "").startswith("evomerge_") and name != VERSION_TABLE

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "include_name": ours})
        assert compare_metadata(context, Base.metadata) == []
        found = inspect(conn)
        for table, names in CHECKS.items():
            assert {c["name"] for c in found.get_check_constraints(table)} >= names, table


def _older(tmp_path: Path, name: str) -> Path:
    db = tmp_path / "old.db"
    shutil.copy(DATA / name, db)
    return db


def test_new_database_is_made_at_the_head(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    Repository(f"sqlite:///{db}").close()
    assert _versions(db) == ([(SCHEMA_VERSION,)], [(5,)])  # 5: past what the old runner knew
    assert_schema_is_declared(create_engine(f"sqlite:///{db}"))


@pytest.mark.parametrize(("fixture", "legacy", "done"), [("evomerge-0.1.0.db", [], 10),
                                                         ("evomerge-schema4.db", [(4,)], 12)])
def test_older_database_is_upgraded_and_a_search_resumes(tmp_path: Path, fixture: str,
                                                         legacy: list[tuple[int]], done: int) -> None:
    db = _older(tmp_path, fixture)
    assert _versions(db) == ([], legacy)
    before = _rows(db, "SELECT id, trial_number, origin, state, recipe_hash, fitness FROM evomerge_candidates "
                       "ORDER BY id")
    assert len(before) == done

    status = _cli("status", "--storage", f"sqlite:///{db}", "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["done"] == done
    assert _versions(db) == ([(SCHEMA_VERSION,)], [(5,)])
    assert_schema_is_declared(create_engine(f"sqlite:///{db}"))

    for part in ("models", "tasks"):
        shutil.copytree(DEMO / part, FIXTURE_HOME / part, dirs_exist_ok=True)
    shutil.copy(DATA / "evomerge-0.1.0.yaml", FIXTURE_HOME / "search.yaml")
    run = _cli("search", str(FIXTURE_HOME / "search.yaml"), "--storage", f"sqlite:///{db}", "--study", "prev",
               "--max-trials", str(done + 2), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{done}/{done + 2} trials done before this run" in run.stderr

    after = _rows(db, "SELECT id, trial_number, origin, state, recipe_hash, fitness FROM evomerge_candidates "
                      "ORDER BY id")
    finished = _rows(db, "SELECT count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
                         "WHERE s.study_name = 'prev' AND t.state = 'COMPLETE'")[0][0]
    assert after[:done] == before  # the old candidates kept, numbers, strings and scores unchanged
    assert len(after) >= done + 2 and isinstance(finished, int) and finished >= done + 2


def test_revisions_ship_as_package_data() -> None:
    """An installed evomerge migrates with the files pyproject's package data names."""
    import tomllib

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    storage = ROOT / "storage"
    shipped = {f for g in globs["evomerge.storage"] for f in storage.glob(g)}
    assert {f for f in (storage / "revisions").rglob("*.py")} == shipped


def test_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    db = _older(tmp_path, "evomerge-0.1.0.db")
    Repository(f"sqlite:///{db}").close()
    newer = f"{int(SCHEMA_VERSION) + 1:04d}"
    with sqlite3.connect(db) as conn:
        conn.execute(f"UPDATE {VERSION_TABLE} SET version_num = ?", (newer,))
    with pytest.raises(SchemaTooNew, match=f"version {newer}"):
        Repository(f"sqlite:///{db}")
    proc = _cli("status", "--storage", f"sqlite:///{db}", cwd=tmp_path)
    assert proc.returncode == 2
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        f"evomerge: error: the database's schema is version {newer}, newer than this evomerge's "
        f"({SCHEMA_VERSION}): upgrade evomerge to read or write it"]


# --- PostgreSQL ------------------------------------------------------------------------------


@pytest.fixture()
def pg_database() -> Iterator[str]:
    """The URL of a database of its own on the test server, dropped afterwards."""
    if not PG_URL:
        pytest.skip("EVOMERGE_TEST_POSTGRES_URL not set (see .ci/postgres.sh)")
    name = f"evomerge_schema_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
        admin.dispose()


def test_new_database_on_postgres(pg_database: str) -> None:
    repo = Repository(pg_database)
    study = repo.create_study("s", "{}")
    repo.add_candidate(study.id, "{}", "h", "cma")  # type: ignore[arg-type]  # a plain string is the member
    assert_schema_is_declared(repo.engine)
    with repo.engine.begin() as conn, pytest.raises(Exception, match="ck_evomerge_candidates_state"):
        conn.execute(text("UPDATE evomerge_candidates SET state = 'lost'"))
    repo.close()


def _hand_written_version_4(engine: Engine) -> None:
    """What the old runner left at its version 4: its tables and a row each, its version row,
    no alembic table."""
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0004")
        conn.execute(text(f"DROP TABLE {VERSION_TABLE}"))
        conn.execute(text("CREATE TABLE evomerge_schema_version (id INTEGER PRIMARY KEY, version INTEGER NOT NULL, "
                          "updated_at FLOAT NOT NULL)"))
        conn.execute(text("INSERT INTO evomerge_schema_version VALUES (1, 4, 0)"))
        conn.execute(text("INSERT INTO evomerge_studies (id, name, config_json, created_at, device) "
                          "VALUES (1, 'old', '{}', 0, 'cpu')"))
        conn.execute(text("INSERT INTO evomerge_candidates (study_id, origin, recipe_json, recipe_hash, state, "
                          "attempt, created_at, updated_at, documents) "
                          "VALUES (1, 'untuned', '{}', 'h', 'complete', 1, 0, 0, 24)"))


def test_hand_written_version_4_on_postgres_is_stamped_and_upgraded(pg_database: str) -> None:
    engine = create_engine(pg_database)
    _hand_written_version_4(engine)
    assert upgrade(engine) == ("0004", SCHEMA_VERSION)
    assert_schema_is_declared(engine)
    repo = Repository(pg_database)
    [cand] = repo.candidates(1)
    assert (cand.origin, cand.state, cand.documents) == ("untuned", "complete", 24)
    repo.close()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM evomerge_schema_version")).scalar() == 5
    engine.dispose()


OPENER = "import sys; from evomerge.storage.repository import Repository; Repository(sys.argv[1]).close()"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_controllers_opening_an_old_database_at_once_upgrade_it_once(tmp_path: Path, backend: str,
                                                                     request: pytest.FixtureRequest) -> None:
    """Four processes open a database of the old runner together: the upgrade runs under a
    lock, so each either upgrades it or finds it upgraded; none fails, rows are kept."""
    if backend == "postgresql":
        url = request.getfixturevalue("pg_database")
        _hand_written_version_4(create_engine(url))
    else:
        url = f"sqlite:///{_older(tmp_path, 'evomerge-schema4.db')}"
    env = cli_env()
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, url], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).all() == [(SCHEMA_VERSION,)]
        assert conn.execute(text("SELECT count(*) FROM evomerge_candidates")).scalar() == (
            1 if backend == "postgresql" else 12)
    assert_schema_is_declared(engine)
    engine.dispose()
