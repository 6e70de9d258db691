"""Whether an attempt's job ran (or may have), as a column: a job that never started spends
none of the candidate's attempts. Until now the pool wrote it as a "not run: " prefix of the
outcome text, which the controller parsed; those rows are read once here."""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.add_column("evomerge_attempts", sa.Column("ran", sa.Boolean, nullable=False, server_default=sa.true()))
    attempts = sa.table("evomerge_attempts", sa.column("ran", sa.Boolean), sa.column("outcome", sa.Text))
    op.get_bind().execute(attempts.update().where(attempts.c.outcome.like("not run: %")).values(ran=False))


def downgrade() -> None:
    raise NotImplementedError("evomerge migrates forward only")
