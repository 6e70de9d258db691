"""The tables of evomerge 0.1.0 (studies, candidates, attempts, generations).

Databases that release wrote are stamped here (they have these tables and no version
table), and a new database starts its chain here.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "evomerge_studies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("config_json", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("lease_owner", sa.String(255)),
        sa.Column("lease_until", sa.Float))
    op.create_table(
        "evomerge_candidates",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("evomerge_studies.id"), nullable=False, index=True),
        sa.Column("trial_number", sa.Integer),
        sa.Column("origin", sa.String(32), nullable=False),
        sa.Column("generation", sa.Integer),
        sa.Column("genes_json", sa.Text),
        sa.Column("recipe_json", sa.Text, nullable=False),
        sa.Column("recipe_hash", sa.String(64), nullable=False, index=True),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("duplicate_of", sa.Integer),
        sa.Column("scores_json", sa.Text),
        sa.Column("fitness", sa.Float),
        sa.Column("heldout_json", sa.Text),
        sa.Column("heldout_fitness", sa.Float),
        sa.Column("materialize_s", sa.Float),
        sa.Column("evaluate_s", sa.Float),
        sa.Column("worker", sa.String(255)),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False))
    op.create_table(
        "evomerge_attempts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("candidate_id", sa.Integer, sa.ForeignKey("evomerge_candidates.id"), nullable=False,
                  index=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("split", sa.String(16), nullable=False),
        sa.Column("worker", sa.String(255)),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float),
        sa.Column("outcome", sa.Text))
    op.create_table(
        "evomerge_generations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("evomerge_studies.id"), nullable=False, index=True),
        sa.Column("index", sa.Integer, nullable=False),
        sa.Column("candidate_ids_json", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("study_id", "index"))


def downgrade() -> None:
    raise NotImplementedError("evomerge migrates forward only")
