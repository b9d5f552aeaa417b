"""One way to open a SQLAlchemy engine for a TuneDock store (SQLite file or PostgreSQL)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def open_engine(url: str) -> Engine:
    """SQLite: parent directory created, WAL, foreign keys, a 30 s busy timeout, usable from
    worker threads. PostgreSQL: a modest pool with liveness checks."""
    kwargs: dict = {"pool_pre_ping": True}
    if is_sqlite(url):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:
        kwargs.update(pool_size=8, max_overflow=8)
    engine = create_engine(url, **kwargs)
    if is_sqlite(url):
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def migrate(url: str, package: str, revision: str = "head") -> None:
    """Bring a store's schema to `revision` (the newest by default) of `package`'s Alembic migrations."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resources.files(package) / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, revision)
