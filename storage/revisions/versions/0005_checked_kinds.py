"""Candidate state and origin and attempt split are checked by the database (storage/kinds.py):
CHECK constraints over the strings stored all along, so no row changes. SQLite cannot add a
constraint to a table, so there the two tables are copied (alembic's batch mode; the
runner turns foreign keys off around it, as SQLite's own procedure asks).

Also keeps the old runner's version row at 5, past its last version (4): an evomerge of that
runner refuses this database rather than migrating it again."""

import time

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"

# The values as they were when this revision was written (a later one that adds a value
# replaces the constraint with its own list).
STATES = ("queued", "running", "complete", "failed")
ORIGINS = ("source", "untuned", "cma", "random", "tpe", "gp", "nsga2")
SPLITS = ("search", "heldout")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    with op.batch_alter_table("evomerge_candidates") as table:
        table.create_check_constraint("ck_evomerge_candidates_state", _in("state", STATES))
        table.create_check_constraint("ck_evomerge_candidates_origin", _in("origin", ORIGINS))
    with op.batch_alter_table("evomerge_attempts") as table:
        table.create_check_constraint("ck_evomerge_attempts_split", _in("split", SPLITS))
    version = sa.table("evomerge_schema_version", sa.column("id", sa.Integer), sa.column("version", sa.Integer),
                       sa.column("updated_at", sa.Float))
    bind = op.get_bind()
    if not sa.inspect(bind).has_table("evomerge_schema_version"):
        op.create_table("evomerge_schema_version", sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("version", sa.Integer, nullable=False),
                        sa.Column("updated_at", sa.Float, nullable=False))
    bind.execute(version.delete())
    bind.execute(version.insert().values(id=1, version=5, updated_at=time.time()))


def downgrade() -> None:
    raise NotImplementedError("evomerge migrates forward only")
