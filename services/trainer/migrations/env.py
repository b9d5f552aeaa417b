"""Alembic environment of the trainer's job store: the URL comes from the store (or `alembic -x url=...`)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from services.trainer.store import Base

config = context.config
url = config.get_main_option("sqlalchemy.url") or context.get_x_argument(as_dictionary=True).get("url") or ""
engine = create_engine(url)
with engine.connect() as conn:
    context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
