"""Throw-away PostgreSQL databases for tests.

Needs TUNEDOCK_TEST_POSTGRES_URL pointing at a server whose user may create databases;
`.ci/run` starts one and sets TUNEDOCK_REQUIRE_POSTGRES=1, which turns the skip into a failure.
"""

from __future__ import annotations

import os
import uuid

import pytest

POSTGRES_URL = os.environ.get("TUNEDOCK_TEST_POSTGRES_URL", "")
REQUIRE_POSTGRES = os.environ.get("TUNEDOCK_REQUIRE_POSTGRES") == "1"


def postgres_database():
    """Create a throw-away database on the test server; returns (url, drop)."""
    import psycopg
    from sqlalchemy.engine import make_url

    if not POSTGRES_URL:
        message = "PostgreSQL cases need TUNEDOCK_TEST_POSTGRES_URL=postgresql+psycopg://user:pw@host/db (see .ci/run)"
        if REQUIRE_POSTGRES:
            pytest.fail(message)
        pytest.skip(message)
    base = make_url(POSTGRES_URL)
    name = f"tunedock_test_{uuid.uuid4().hex[:10]}"
    conninfo = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop():
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return base.set(database=name).render_as_string(hide_password=False), drop
