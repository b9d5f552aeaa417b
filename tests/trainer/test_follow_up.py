"""A Full/Freeze job's extraction (then_extract): submitted once when the job succeeds, and at recovery
if the trainer died in between; refused up front for the methods whose adapter serves as trained."""

from __future__ import annotations

import asyncio

import pytest

from services.common.blobs import LocalBlobStore
from services.trainer.core import TrainerCore, follow_up_id, state_event
from services.trainer.domain import (
    ExtractSpec,
    FullConfig,
    JobEvent,
    JobSpec,
    LoraConfig,
    MethodConfig,
    PublishedEvent,
    StateEvent,
)
from services.trainer.store import JobStore
from tunedock.errors import InvalidArgument


@pytest.fixture
def core(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield TrainerCore(
        store, LocalBlobStore(tmp_path / "blobs"), None, 1, 3, 1 << 20, tmp_path, "127.0.0.1:1", max_lora_rank=32
    )
    store.close()


def _full(**extract) -> JobSpec:
    return JobSpec(
        base_model="/models/base",
        method=MethodConfig(full=FullConfig()),
        output_name="bot",
        project="team-a",
        labels={"team": "a"},
        then_extract=ExtractSpec(**extract),
    )


def _succeed(core: TrainerCore, job_id: str) -> None:
    core.store.update(job_id, state="running", attempt=1)
    asyncio.run(core.report(job_id, 1, JobEvent(published=PublishedEvent(ref="bot:1"))))
    asyncio.run(core.report(job_id, 1, JobEvent(state=StateEvent(state="succeeded"))))


def test_the_extraction_is_submitted_once_when_the_job_succeeds(core):
    core.store.add_job("job-1", _full(rank=8), state_event("queued"), "team-a")
    _succeed(core, "job-1")
    follow = core.store.get_job(follow_up_id("job-1"))
    assert follow.state == "queued" and follow.project == "team-a"
    assert follow.spec.extract == ExtractSpec(source="bot:1", rank=8, max_rank=32)
    assert follow.spec.output_name == "bot-lora" and follow.spec.base_model == "/models/base"
    assert follow.spec.labels == {"team": "a", "tunedock.follows": "job-1"}
    asyncio.run(core.recover())  # nothing to redo
    assert [j.id for j in core.store.list_jobs("", 10).items].count(follow_up_id("job-1")) == 1


def test_a_trainer_that_died_before_submitting_it_submits_it_at_recovery(core):
    core.store.add_job("job-2", _full(), state_event("queued"), "team-a")
    core.store.update("job-2", [state_event("succeeded")], state="succeeded", output_ref="bot:4")
    assert core.follow_up(core.store.get_job("job-2")) is None
    asyncio.run(core.recover())
    follow = core.follow_up(core.store.get_job("job-2"))
    assert follow is not None and follow.spec.extract.source == "bot:4"


def test_then_extract_is_refused_where_it_cannot_apply(core):
    lora = JobSpec(method=MethodConfig(lora=LoraConfig()), output_name="x", then_extract=ExtractSpec())
    with pytest.raises(InvalidArgument, match="serves as trained"):
        core._validate_then_extract(lora)
    with pytest.raises(InvalidArgument, match="above 32"):
        core._validate_then_extract(_full(max_rank=64))
    with pytest.raises(InvalidArgument, match="source must be empty"):
        core._validate_then_extract(_full(source="other:1"))
