"""The trainer store's Alembic migrations produce exactly the schema the models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from services.common.db import migrate
from services.trainer.store import Base


def test_migrated_schema_matches_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrate(url, "services.trainer")
    migrate(url, "services.trainer")  # idempotent
    engine = create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
