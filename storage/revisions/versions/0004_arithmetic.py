"""The merge arithmetic and device a study searched with, so a replay elsewhere or under other
arithmetic says so (studies of older versions: NULL, read as arithmetic 1). The hand-written
runner's version 4, its last."""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.add_column("evomerge_studies", sa.Column("merge_arithmetic", sa.Integer))
    op.add_column("evomerge_studies", sa.Column("device", sa.String(16)))


def downgrade() -> None:
    raise NotImplementedError("evomerge migrates forward only")
