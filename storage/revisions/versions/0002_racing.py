"""Multi-fidelity racing: the documents a candidate was scored on, and whether racing stopped
it (candidates of older versions were scored in full: documents unknown). The hand-written
runner's version 2."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.add_column("evomerge_candidates", sa.Column("documents", sa.Integer))
    op.add_column("evomerge_candidates", sa.Column("raced_out", sa.Boolean, nullable=False,
                                                   server_default=sa.false()))


def downgrade() -> None:
    raise NotImplementedError("evomerge migrates forward only")
