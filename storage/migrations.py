"""The schema version of our tables, and the migrations that bring an older database up to it.

Why not alembic: our part of the database is four tables beside Optuna's, and Optuna already
keeps *its* alembic state in the same database (table ``alembic_version``). Alembic for ours
would need a second version table, a script folder shipped as package data and an ``env.py``
for a handful of DDL steps. Instead: one row in ``evomerge_schema_version`` holds the
version, and :data:`MIGRATIONS` is an ordered list of small functions, each run in its own
transaction together with the version bump, so a crash mid-upgrade leaves the database at
one of the versions (SQLite and PostgreSQL both have transactional DDL).

Rules for a future change of ``storage/tables.py``: append a :class:`Migration` with the next
version that turns the previous schema into the new one (``ALTER TABLE ... ADD COLUMN`` with
a default, an index, a backfill); never edit a released one. A database newer than this code
is refused (:class:`SchemaTooNew`) rather than written to.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, inspect, select, text, update

from evomerge.storage.tables import Base, SchemaVersionRow, StudyRow


class SchemaTooNew(RuntimeError):
    """The database was written by a newer evomerge; one line for the user."""


@dataclass(frozen=True)
class Migration:
    """Turns schema ``version - 1`` into ``version``."""

    version: int
    what: str
    run: Callable[[Connection], None]


def _stamp_only(_conn: Connection) -> None:
    """0.1.0's tables are version 1's: only the version table is new (made by create_all)."""


def _racing_columns(conn: Connection) -> None:
    """Multi-fidelity racing: the documents a candidate was scored on, and whether racing
    stopped it (candidates of older versions were scored in full: documents unknown)."""
    conn.execute(text("ALTER TABLE evomerge_candidates ADD COLUMN documents INTEGER"))
    conn.execute(text("ALTER TABLE evomerge_candidates ADD COLUMN raced_out BOOLEAN NOT NULL DEFAULT FALSE"))


def _cpu_seconds_column(conn: Connection) -> None:
    """The worker's CPU seconds while scoring a candidate, beside the wall-clock ones: on a
    node shared with other work the wall clock measures the neighbours too."""
    conn.execute(text("ALTER TABLE evomerge_candidates ADD COLUMN evaluate_cpu_s FLOAT"))


def _arithmetic_columns(conn: Connection) -> None:
    """The merge arithmetic and device a study searched with, so a replay elsewhere or under
    other arithmetic says so (studies of older versions: NULL, read as arithmetic 1)."""
    conn.execute(text("ALTER TABLE evomerge_studies ADD COLUMN merge_arithmetic INTEGER"))
    conn.execute(text("ALTER TABLE evomerge_studies ADD COLUMN device VARCHAR(16)"))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "record the schema version (databases of evomerge 0.1.0 have none)", _stamp_only),
    Migration(2, "documents scored per candidate, and whether racing stopped it", _racing_columns),
    Migration(3, "CPU seconds of each candidate's scoring", _cpu_seconds_column),
    Migration(4, "the merge arithmetic and device of each study", _arithmetic_columns),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def stored_version(conn: Connection) -> int | None:
    """The database's schema version: None for a database without our tables, 0 for one of
    evomerge 0.1.0 (our tables, no version table)."""
    tables = set(inspect(conn).get_table_names())
    if SchemaVersionRow.__tablename__ in tables:
        version = conn.execute(select(SchemaVersionRow.version).where(SchemaVersionRow.id == 1)).scalar()
        if version is not None:
            return int(version)
    return 0 if StudyRow.__tablename__ in tables else None


def _set_version(conn: Connection, version: int) -> None:
    values = {"version": version, "updated_at": time.time()}
    if conn.execute(update(SchemaVersionRow).where(SchemaVersionRow.id == 1).values(**values)).rowcount == 0:
        conn.execute(SchemaVersionRow.__table__.insert().values(id=1, **values))


def upgrade(engine: Engine) -> tuple[int | None, int]:
    """Create our tables, or migrate them to :data:`SCHEMA_VERSION`; returns (version found
    (None: a new database), version now). Idempotent; :class:`SchemaTooNew` when the
    database is ahead of this code."""
    with engine.connect() as conn:
        found = stored_version(conn)
    if found is not None and found > SCHEMA_VERSION:
        raise SchemaTooNew(f"the database's schema is version {found}, newer than this evomerge's "
                           f"({SCHEMA_VERSION}): upgrade evomerge to read or write it")
    if found is None:
        with engine.begin() as conn:
            Base.metadata.create_all(conn)
            _set_version(conn, SCHEMA_VERSION)
        return None, SCHEMA_VERSION
    for migration in MIGRATIONS[found:]:
        with engine.begin() as conn:
            # Re-read inside the transaction: another controller may have migrated meanwhile.
            now = stored_version(conn) or 0
            if now >= migration.version:
                continue
            Base.metadata.create_all(conn)  # tables new in this version (and the version table)
            migration.run(conn)
            _set_version(conn, migration.version)
    return found, SCHEMA_VERSION
