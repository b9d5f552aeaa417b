"""The job store on SQLite and on a real PostgreSQL: jobs, ordered events and restarts survive."""

from __future__ import annotations

import pytest

from services.trainer.core import state_event
from services.trainer.store import JobStore
from tests.postgres import postgres_database
from tunedock.errors import NotFound


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        url, drop = postgres_database()
        yield url
        drop()


def test_jobs_and_events_persist_across_reopen(url):
    store = JobStore(url)
    store.add_job("job-1", b"spec", state_event("queued"))
    store.add_job("job-2", b"spec2", state_event("queued"))
    job, seqs = store.update("job-1", [state_event("running"), b"progress"], state="running", attempt=1, step=3)
    assert seqs == [2, 3] and job.state == "running"
    store.close()
    reopened = JobStore(url)
    assert reopened.get_job("job-1").step == 3 and reopened.get_job("job-1").attempt == 1
    assert [seq for seq, _ in reopened.events_after("job-1", 0)] == [1, 2, 3]
    assert [data for _, data in reopened.events_after("job-1", 2)] == [b"progress"]
    assert [j.id for j in reopened.jobs_in_state("queued")] == ["job-2"]
    assert reopened.count_state("running") == 1
    assert [j.id for j in reopened.list_jobs("", 10).items] == ["job-2", "job-1"]
    with pytest.raises(NotFound):
        reopened.get_job("job-3")
    reopened.close()


def test_a_store_from_before_projects_gains_the_column(url):
    """Stores written before projects existed open with their items in the "default" project."""
    from sqlalchemy import text

    from services.common.db import open_engine

    blob = "BLOB" if url.startswith("sqlite") else "BYTEA"
    engine = open_engine(url)
    with engine.begin() as conn:  # the datasets and jobs tables as they were
        conn.execute(
            text(
                "CREATE TABLE datasets (id VARCHAR(80) PRIMARY KEY, name VARCHAR(255), format VARCHAR(16), "
                "num_records INTEGER, size INTEGER, sha256 VARCHAR(64), created_at TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                f"CREATE TABLE jobs (id VARCHAR(40) PRIMARY KEY, spec {blob}, state VARCHAR(16), error TEXT, "
                "step INTEGER, total_steps INTEGER, attempt INTEGER, output_ref VARCHAR(200), metrics JSON, "
                "cancel_requested BOOLEAN, created_at TIMESTAMP, started_at TIMESTAMP, ended_at TIMESTAMP, "
                "last_seq INTEGER)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO jobs VALUES ('job-old', :spec, 'succeeded', '', 1, 1, 1, 'x:1', '{}', false, "
                "CURRENT_TIMESTAMP, NULL, NULL, 0)"
            ),
            {"spec": b"spec"},
        )
    engine.dispose()
    store = JobStore(url)
    assert store.get_job("job-old").project == "default"
    store.add_job("job-new", b"spec", state_event("queued"), project="team-a")
    assert [j.id for j in store.list_jobs("", 10, "", {"team-a"}).items] == ["job-new"]
    store.close()


def test_lists_page_by_keyset_so_new_items_neither_repeat_nor_vanish(url):
    from tunedock.errors import InvalidArgument

    store = JobStore(url)
    for i in range(5):
        store.add_job(f"job-{i}", b"spec", state_event("queued"))
    first = store.list_jobs("", 2)
    assert [j.id for j in first.items] == ["job-4", "job-3"] and first.next_token
    store.add_job("job-new", b"spec", state_event("queued"))  # lands before the first page: not seen below
    second = store.list_jobs("", 2, first.next_token)
    third = store.list_jobs("", 2, second.next_token)
    assert [j.id for j in second.items + third.items] == ["job-2", "job-1", "job-0"] and third.next_token == ""
    assert [j.id for j in store.list_jobs("queued", 50).items][:2] == ["job-new", "job-4"]
    for token in ("not-a-token", "cDE6"):  # garbage; a token without an item
        with pytest.raises(InvalidArgument, match="pass next_page_token unchanged"):
            store.list_jobs("", 2, token)
    store.close()
