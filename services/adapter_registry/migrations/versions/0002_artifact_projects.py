"""artifacts belong to a project (tenant)

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Artifacts published before projects existed land in "default".
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("project", sa.String(length=64), server_default="default", nullable=False))
        batch_op.create_index(batch_op.f("ix_artifacts_project"), ["project"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_artifacts_project"))
        batch_op.drop_column("project")
