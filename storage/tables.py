"""Our tables, beside Optuna's in the same database.

Their schema changes only through a revision in storage/revisions/ (storage/migrations.py).
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import Boolean, Enum, false, true, Float, ForeignKey, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from evomerge.storage.kinds import Origin, Split, State


class Base(DeclarativeBase):
    # CHECK constraints get stable names (ck_<table>_<column>), which a migration can address.
    metadata = MetaData(naming_convention={"ix": "ix_%(column_0_label)s",
                                           "ck": "ck_%(table_name)s_%(constraint_name)s"})


def _kind(enum: type[StrEnum], column: str, length: int) -> Enum:
    """A VARCHAR of ``length`` holding the enum's values (not its member names), checked by
    a CHECK constraint named after ``column``; unknown strings are refused on write."""
    return Enum(enum, name=column, native_enum=False, create_constraint=True, length=length,
                validate_strings=True, values_callable=lambda members: [m.value for m in members])


class StudyRow(Base):
    """A search: its config, and the lease of the controller currently driving it."""

    __tablename__ = "evomerge_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    config_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    lease_owner: Mapped[str | None] = mapped_column(String(255), nullable=True)  # host:pid
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the merge arithmetic its merges used (workers/kernels/arithmetic.py; None: stored before versions, 1)
    merge_arithmetic: Mapped[int | None] = mapped_column(Integer, nullable=True)
    device: Mapped[str | None] = mapped_column(String(16), nullable=True)  # where it searched: cpu, cuda


class CandidateRow(Base):
    """One candidate model: recipe, where it came from, and its evaluation."""

    __tablename__ = "evomerge_candidates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("evomerge_studies.id"), index=True)
    trial_number: Mapped[int | None] = mapped_column(Integer, nullable=True)  # Optuna trial
    origin: Mapped[Origin] = mapped_column(_kind(Origin, "origin", 32))
    generation: Mapped[int | None] = mapped_column(Integer, nullable=True)
    genes_json: Mapped[str | None] = mapped_column(Text, nullable=True)  # optimizer genotype
    recipe_json: Mapped[str] = mapped_column(Text)
    recipe_hash: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[State] = mapped_column(_kind(State, "state", 16), index=True)
    duplicate_of: Mapped[int | None] = mapped_column(Integer, nullable=True)
    scores_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    fitness: Mapped[float | None] = mapped_column(Float, nullable=True)
    heldout_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    heldout_fitness: Mapped[float | None] = mapped_column(Float, nullable=True)
    materialize_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    evaluate_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    documents: Mapped[int | None] = mapped_column(Integer, nullable=True)  # search documents scored (v2)
    raced_out: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  # stopped by racing (v2)
    evaluate_cpu_s: Mapped[float | None] = mapped_column(Float, nullable=True)  # worker CPU while scoring (v3)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class AttemptRow(Base):
    """Every dispatch of a candidate to a worker, including the ones that died."""

    __tablename__ = "evomerge_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("evomerge_candidates.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    split: Mapped[Split] = mapped_column(_kind(Split, "split", 16))
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    outcome: Mapped[str | None] = mapped_column(Text, nullable=True)  # ok | error text
    ran: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())  # False: never started (v6)


class GenerationRow(Base):
    """A generation the optimizer was told: which candidates, in order (its replay log)."""

    __tablename__ = "evomerge_generations"
    __table_args__ = (UniqueConstraint("study_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("evomerge_studies.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    candidate_ids_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class SchemaVersionRow(Base):
    """The schema version of the hand-written migration runner that preceded alembic (one
    row; databases of evomerge 0.1.0 have none). Alembic keeps the version now, in
    ``evomerge_alembic_version``; this row stays at 5 so that an evomerge of the old runner
    (which knew versions up to 4) refuses the database instead of migrating it again."""

    __tablename__ = "evomerge_schema_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[float] = mapped_column(Float)
