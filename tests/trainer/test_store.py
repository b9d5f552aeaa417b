"""The job store on SQLite and on a real PostgreSQL: jobs, ordered events and restarts survive."""

from __future__ import annotations

import pytest

from services.trainer.core import state_event
from services.trainer.domain import JobEvent, JobSpec, ProgressEvent
from services.trainer.store import JobStore
from tests.postgres import postgres_database
from tunedock.errors import NotFound
from tunedock.v1 import common_pb2
from tunedock.v1 import trainer_pb2 as pb


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
    store.add_job("job-1", JobSpec(), state_event("queued"))
    store.add_job("job-2", JobSpec(output_name="two"), state_event("queued"))
    progress = JobEvent(progress=ProgressEvent(step=3, total_steps=10, loss=1.5))
    job, seqs = store.update("job-1", [state_event("running"), progress], state="running", attempt=1, step=3)
    assert seqs == [2, 3] and job.state == "running"
    store.close()
    reopened = JobStore(url)
    assert reopened.get_job("job-1").step == 3 and reopened.get_job("job-1").attempt == 1
    assert [e.sequence for e in reopened.events_after("job-1", 0)] == [1, 2, 3]
    assert reopened.events_after("job-1", 2) == [progress.model_copy(update={"sequence": 3})]
    assert reopened.get_job("job-2").spec == JobSpec(output_name="two")
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
            {"spec": pb.JobSpec(output_name="old").SerializeToString()},
        )
    engine.dispose()
    store = JobStore(url)
    assert store.get_job("job-old").project == "default"
    assert store.get_job("job-old").spec == JobSpec(output_name="old")
    store.add_job("job-new", JobSpec(), state_event("queued"), project="team-a")
    assert [j.id for j in store.list_jobs("", 10, "", {"team-a"}).items] == ["job-new"]
    store.close()


def test_lists_page_by_keyset_so_new_items_neither_repeat_nor_vanish(url):
    from tunedock.errors import InvalidArgument

    store = JobStore(url)
    for i in range(5):
        store.add_job(f"job-{i}", JobSpec(), state_event("queued"))
    first = store.list_jobs("", 2)
    assert [j.id for j in first.items] == ["job-4", "job-3"] and first.next_token
    store.add_job("job-new", JobSpec(), state_event("queued"))  # lands before the first page: not seen below
    second = store.list_jobs("", 2, first.next_token)
    third = store.list_jobs("", 2, second.next_token)
    assert [j.id for j in second.items + third.items] == ["job-2", "job-1", "job-0"] and third.next_token == ""
    assert [j.id for j in store.list_jobs("queued", 50).items][:2] == ["job-new", "job-4"]
    for token in ("not-a-token", "cDE6"):  # garbage; a token without an item
        with pytest.raises(InvalidArgument, match="pass next_page_token unchanged"):
            store.list_jobs("", 2, token)
    store.close()


def test_jobs_stored_as_protos_by_the_previous_schema_are_converted(url):
    """Revision 0004 turns the serialized JobSpec and JobEvent rows of a 0003 store into the domain's JSON."""
    from sqlalchemy import text

    from services.common.db import migrate, open_engine

    migrate(url, "services.trainer", "0003")
    spec = pb.JobSpec(
        base_model="/models/qwen",
        output_name="old-lora",
        train_dataset_ids=["ds-1"],
        method=common_pb2.MethodConfig(lora=common_pb2.LoraConfig(r=4, optimizer=common_pb2.OPTIMIZER_ADAMW_8BIT)),
        hyperparameters=pb.Hyperparameters(max_steps=20, seed=3),
        labels=[common_pb2.Label(key="team", value="a")],
    )
    events = [
        pb.JobEvent(state=pb.StateEvent(state=pb.JOB_STATE_QUEUED, message="")),
        pb.JobEvent(progress=pb.ProgressEvent(step=5, total_steps=20, loss=1.25)),
        pb.JobEvent(
            published=pb.PublishedEvent(ref="old-lora:1", metrics=[common_pb2.Metric(name="eval_loss", value=0.5)])
        ),
    ]
    for event in events:
        event.time.FromSeconds(1_700_000_000)
    engine = open_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, spec, state, error, step, total_steps, attempt, output_ref, metrics, "
                "cancel_requested, created_at, last_seq, project, failures) VALUES ('job-old', :spec, 'succeeded', "
                "'', 20, 20, 1, 'old-lora:1', '{}', false, CURRENT_TIMESTAMP, 3, 'team-a', 0)"
            ),
            {"spec": spec.SerializeToString()},
        )
        for seq, event in enumerate(events, 1):
            conn.execute(
                text("INSERT INTO job_events (job_id, seq, data) VALUES ('job-old', :seq, :data)"),
                {"seq": seq, "data": event.SerializeToString()},
            )
    engine.dispose()
    from services.common.protoconv import to_proto

    store = JobStore(url)  # migrates to the newest revision
    job = store.get_job("job-old")
    assert to_proto(job.spec, pb.JobSpec()) == spec
    assert job.spec.method.lora.optimizer == "adamw_8bit" and job.spec.labels == {"team": "a"}
    replayed = store.events_after("job-old", 0)
    assert [e.sequence for e in replayed] == [1, 2, 3]
    for seq, (old, new) in enumerate(zip(events, replayed, strict=True), 1):
        old.sequence = seq
        assert to_proto(new, pb.JobEvent()) == old
    store.close()


def _dataset(dataset_id: str, sha: str, project: str = "default"):
    from services.trainer.store import DatasetRow, now

    return DatasetRow(
        id=dataset_id,
        name="d.jsonl",
        format="alpaca",
        num_records=1,
        size=10,
        sha256=sha,
        created_at=now(),
        project=project,
        ignored_columns=[],
        stats=None,
    )


def test_deleting_a_dataset_frees_its_bytes_only_when_no_other_dataset_holds_them(url):
    store = JobStore(url)
    store.add_dataset(_dataset("ds-a", "f" * 64))
    store.add_dataset(_dataset("ds-b", "f" * 64, project="team-b"))  # the same bytes in another project
    store.add_dataset(_dataset("ds-c", "e" * 64))
    assert store.delete_dataset("ds-a") is None  # ds-b still holds them
    assert store.delete_dataset("ds-b") == "f" * 64 and store.delete_dataset("ds-c") == "e" * 64
    with pytest.raises(NotFound):
        store.get_dataset("ds-a")
    with pytest.raises(NotFound):
        store.delete_dataset("ds-a")


def test_events_page_newest_first_and_unfinished_jobs(url):
    store = JobStore(url)
    store.add_job("job-1", JobSpec(), state_event("queued"))
    store.add_job("job-2", JobSpec(), state_event("queued"))
    store.update("job-1", [JobEvent(progress=ProgressEvent(step=s)) for s in (1, 2, 3)], state="running")
    store.update("job-2", [state_event("succeeded")], state="succeeded")
    assert [e.sequence for e in store.events_before("job-1", 0, 2)] == [4, 3]
    assert [e.sequence for e in store.events_before("job-1", 3, 10)] == [2, 1]
    assert [j.id for j in store.unfinished_jobs()] == ["job-1"]
