"""The worker's CPU seconds while scoring a candidate, beside the wall-clock ones: on a node
shared with other work the wall clock measures the neighbours too. The hand-written
runner's version 3."""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.add_column("evomerge_candidates", sa.Column("evaluate_cpu_s", sa.Float))


def downgrade() -> None:
    raise NotImplementedError("evomerge migrates forward only")
