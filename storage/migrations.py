"""The schema of our tables: alembic revisions (storage/revisions/), run when a repository opens.

Alembic keeps its version in a table of our own, ``evomerge_alembic_version``: Optuna keeps
*its* alembic state in ``alembic_version`` of the same database, and the two must not meet.
The revisions (``revisions/versions/``) and alembic's ``env.py`` ship inside the package
(package data), and run through alembic's command API on our connection: no ``alembic.ini``.

Databases from before alembic carry the hand-written runner's version instead:
evomerge 0.1.0 wrote none (its tables are revision 0001), later ones a row in
``evomerge_schema_version`` (version N is revision 000N, for N up to 4). Such a database is
stamped at its revision and upgraded from there, so nothing stored is lost.

The whole upgrade is one transaction under a lock (SQLite: ``BEGIN IMMEDIATE``;
PostgreSQL: an advisory lock), so a crash leaves the database where it was, and a second
controller opening the database meanwhile waits and then finds it upgraded.

A change of storage/tables.py comes with a new revision file: the next number, its
``down_revision`` the previous head; a released revision is never edited. A database newer
than this code is refused (:class:`SchemaTooNew`) rather than written to.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, select, text

from evomerge.storage.tables import SchemaVersionRow, StudyRow

VERSION_TABLE = "evomerge_alembic_version"
REVISIONS = Path(__file__).with_name("revisions")
_PG_LOCK = 0x65766F6D  # "evom": the advisory lock key of an upgrade on PostgreSQL


class SchemaTooNew(RuntimeError):
    """The database was written by a newer evomerge; one line for the user."""


def alembic_config(conn: Connection | None = None) -> Config:
    """Alembic's configuration for our revisions, migrating on ``conn`` (revisions/env.py)."""
    config = Config()
    config.set_main_option("script_location", str(REVISIONS))
    config.attributes["connection"] = conn  # read by revisions/env.py
    return config


def scripts() -> ScriptDirectory:
    """Our revisions."""
    return ScriptDirectory.from_config(alembic_config())


SCHEMA_VERSION: str = scripts().get_current_head() or ""


def stored_revision(conn: Connection) -> str | None:
    """The database's revision: None for a database without our tables; for one from before
    alembic, the revision its hand-written version stands for. May be a revision this code
    does not know (a newer evomerge wrote it)."""
    tables = set(inspect(conn).get_table_names())
    if VERSION_TABLE in tables:
        current = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
        if current is not None:
            return current
    if SchemaVersionRow.__tablename__ in tables:
        legacy = conn.execute(select(SchemaVersionRow.version).where(SchemaVersionRow.id == 1)).scalar()
        return f"{max(int(legacy or 1), 1):04d}"  # version 1 only added this table to 0.1.0's
    return "0001" if StudyRow.__tablename__ in tables else None


@contextmanager
def _locked(engine: Engine) -> Iterator[Connection]:
    """One transaction holding the database's schema lock (see the module doc)."""
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        if sqlite:
            # SQLite's way to rebuild a table that others reference: foreign keys off, outside
            # the transaction, and checked before the commit.
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()  # SQLAlchemy's autobegun transaction; SQLite has none open yet
        try:
            with conn.begin():
                if sqlite:
                    conn.exec_driver_sql("BEGIN IMMEDIATE")  # pysqlite would defer BEGIN past the DDL
                else:
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
                yield conn
                if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise RuntimeError("schema upgrade left rows whose foreign key points nowhere; rolled back")
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Create our tables, or bring them to :data:`SCHEMA_VERSION`; returns (revision found
    (None: a new database), revision now). Idempotent; :class:`SchemaTooNew` when the
    database is ahead of this code."""
    script = scripts()
    with engine.connect() as conn:
        found = stored_revision(conn)
    _refuse_unknown(script, found)
    if found == SCHEMA_VERSION:
        return found, SCHEMA_VERSION  # the common case: read only, no lock taken
    with _locked(engine) as conn:
        now = stored_revision(conn)  # another controller may have upgraded meanwhile
        _refuse_unknown(script, now)
        if now != SCHEMA_VERSION:
            _run(conn, now)
    return found, SCHEMA_VERSION


def _refuse_unknown(script: ScriptDirectory, revision: str | None) -> None:
    if revision is not None and revision not in {s.revision for s in script.walk_revisions()}:
        raise SchemaTooNew(f"the database's schema is version {revision}, newer than this evomerge's "
                           f"({SCHEMA_VERSION}): upgrade evomerge to read or write it")


def _run(conn: Connection, start: str | None) -> None:
    """Stamp a database from before alembic at its revision, then upgrade to the head, on
    ``conn`` inside its transaction."""
    config = alembic_config(conn)
    current = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
    if start is not None and current is None:
        command.stamp(config, start)
    command.upgrade(config, "head")
