"""jobs count failures apart from attempts; datasets record the columns they ignore

An attempt ends for the job's own reasons (an error, an OOM kill) or for the platform's (a
trainer restart, a registry outage): only the first kind counts against max_attempts.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("failures", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ignored_columns", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("ignored_columns")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("failures")
