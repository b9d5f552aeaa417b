"""datasets, jobs and their event logs, as stores were before migrations existed

A baseline that adopts existing stores: tables made by earlier versions (with create_all) are
kept as they are, missing ones are created, so every store upgrades from here.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "datasets" not in existing:
        op.create_table(
            "datasets",
            sa.Column("id", sa.String(length=80), primary_key=True),
            sa.Column("name", sa.String(length=255), nullable=False),
            sa.Column("format", sa.String(length=16), nullable=False),
            sa.Column("num_records", sa.Integer(), nullable=False),
            sa.Column("size", sa.Integer(), nullable=False),
            sa.Column("sha256", sa.String(length=64), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        )
    if "jobs" not in existing:
        op.create_table(
            "jobs",
            sa.Column("id", sa.String(length=40), primary_key=True),
            sa.Column("spec", sa.LargeBinary(), nullable=False),
            sa.Column("state", sa.String(length=16), nullable=False),
            sa.Column("error", sa.Text(), nullable=False),
            sa.Column("step", sa.Integer(), nullable=False),
            sa.Column("total_steps", sa.Integer(), nullable=False),
            sa.Column("attempt", sa.Integer(), nullable=False),
            sa.Column("output_ref", sa.String(length=200), nullable=False),
            sa.Column("metrics", sa.JSON(), nullable=False),
            sa.Column("cancel_requested", sa.Boolean(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("last_seq", sa.Integer(), nullable=False),
        )
        op.create_index("ix_jobs_state", "jobs", ["state"])
        op.create_index("ix_jobs_created_at", "jobs", ["created_at"])
    if "job_events" not in existing:
        op.create_table(
            "job_events",
            sa.Column("job_id", sa.String(length=40), primary_key=True),
            sa.Column("seq", sa.Integer(), primary_key=True),
            sa.Column("data", sa.LargeBinary(), nullable=False),
        )


def downgrade() -> None:
    op.drop_table("job_events")
    op.drop_table("jobs")
    op.drop_table("datasets")
