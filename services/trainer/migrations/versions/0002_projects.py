"""datasets and jobs belong to a project (tenant)

Stores made before projects existed gain the columns; their items land in "default" (stores
that gained them from the pre-migration code keep them).

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
    inspector = sa.inspect(op.get_bind())
    for table in ("datasets", "jobs"):
        columns = {c["name"] for c in inspector.get_columns(table)}
        indexes = {i["name"] for i in inspector.get_indexes(table)}
        with op.batch_alter_table(table, schema=None) as batch_op:
            if "project" not in columns:
                batch_op.add_column(
                    sa.Column("project", sa.String(length=64), server_default="default", nullable=False)
                )
            if f"ix_{table}_project" not in indexes:
                batch_op.create_index(f"ix_{table}_project", ["project"], unique=False)


def downgrade() -> None:
    for table in ("datasets", "jobs"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f"ix_{table}_project")
            batch_op.drop_column("project")
