"""Fine-tuning from the stock OpenAI clients (Python and Node) against the real stack, through one base URL.

Registry, trainer (real workers) and inference (the session's vLLM engine) with authentication on;
the client is given inference's HTTP port, which serves generation and forwards /v1/files and
/v1/fine_tuning to the trainer's fine-tuning API, as `tunedock up` arranges. Each of the four
methods trains, and its `fine_tuned_model` answers a chat at once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import openai
import pytest

from tests.support.fine_tuning import openai_client, wait
from tests.trainer.conftest import memorization_jsonl
from tunedock.client import RegistryClient, TrainerClient
from tunedock.v1 import trainer_pb2 as pb

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
NODE_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "node"


@pytest.fixture(scope="module")
def stack(fine_tuning_stack):
    return fine_tuning_stack


@pytest.fixture(scope="module")
def alice(stack):
    with openai_client(stack) as c:
        yield c


@pytest.fixture(scope="module")
def finished(four_methods):
    return four_methods


def test_a_file_is_a_tunedock_dataset_with_the_same_id(alice, training_file, stack):
    file, path = training_file
    assert file.id.startswith("ds-") and file.purpose == "fine-tune" and file.bytes == path.stat().st_size
    assert alice.files.retrieve(file.id).filename == "pirate.jsonl"
    assert alice.files.content(file.id).read() == path.read_bytes()
    assert file.id in [f.id for f in alice.files.list()]
    with TrainerClient(stack.trainer.address, token=stack.user_tokens["alice"]) as grpc_client:
        dataset = grpc_client.get_dataset(file.id)  # what `tunedock data ls` shows
    assert dataset.num_records == 8 and dataset.project == "team-a"


def test_a_bad_file_is_refused_with_its_line_number_and_nothing_is_stored(alice, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    before = [f.id for f in alice.files.list()]
    with pytest.raises(openai.BadRequestError) as caught, bad.open("rb") as fh:
        alice.files.create(file=fh, purpose="fine-tune")
    assert "line 2" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught, bad.open("rb") as fh:
        alice.files.create(file=fh, purpose="assistants")
    assert caught.value.body["param"] == "purpose"
    assert [f.id for f in alice.files.list()] == before


def test_each_method_trains_and_its_fine_tuned_model_answers_at_once(alice, finished, stack):
    done, created = finished
    assert created["supervised"].status in ("validating_files", "queued")
    for name, job in done.items():
        assert job.status == "succeeded", (name, job.error)
        assert job.fine_tuned_model and job.trained_tokens and job.trained_tokens > 0, name
        reply = alice.chat.completions.create(
            model=job.fine_tuned_model, messages=[{"role": "user", "content": "What about ship 3?"}], max_tokens=6
        )
        assert reply.model == job.fine_tuned_model and reply.usage.completion_tokens > 0, name
    assert done["supervised"].method.type == "lora" and done["qlora"].method.type == "qlora"
    assert done["supervised"].fine_tuned_model == "pirate-supervised:1"
    # Full and Freeze serve through the adapter extracted from them, with its fidelity in the result.
    for name in ("full", "freeze"):
        job = done[name]
        assert job.fine_tuned_model == f"pirate-{name}-lora:1"
        extraction = job.model_extra["tunedock"]["extraction"]
        assert extraction["state"] == "succeeded" and 0.0 <= extraction["metrics"]["extract_greedy_agreement"] <= 1.0
    assert done["freeze"].model_extra["tunedock"]["extraction"]["metrics"]["extract_rank"] == 8
    served = {m.id for m in alice.models.list().data}
    assert {job.fine_tuned_model for job in done.values()} <= served
    with RegistryClient(stack.registry.address, token=stack.user_tokens["alice"]) as registry:
        lineage = registry.get(done["qlora"].fine_tuned_model).lineage
    assert lineage.job_id == done["qlora"].id


def test_events_checkpoints_and_the_result_file(alice, finished):
    job = finished[0]["supervised"]
    events = alice.fine_tuning.jobs.list_events(job.id, limit=100).data
    steps = [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert steps == [3, 2, 1]  # newest first
    assert events[0].message.startswith("The job has successfully completed")
    page = alice.fine_tuning.jobs.list_events(job.id, limit=2)
    assert page.has_more and len(page.data) == 2
    rest = alice.fine_tuning.jobs.list_events(job.id, limit=100, after=page.data[-1].id).data
    assert [e.id for e in page.data + rest] == [e.id for e in events]
    checkpoints = alice.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints[0].step_number == 3 and checkpoints[0].fine_tuned_model_checkpoint == job.fine_tuned_model
    assert checkpoints[0].metrics.train_loss == pytest.approx(
        next(e.data["train_loss"] for e in events if e.type == "metrics")
    )
    (results,) = job.result_files
    rows = alice.files.content(results).read().decode().splitlines()
    assert rows[0].startswith("step,train_loss") and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    # A validation file: its loss at the end, in the events, the checkpoint and the CSV.
    qlora = finished[0]["qlora"]
    assert qlora.validation_file == qlora.training_file
    valid = [
        e.data["valid_loss"]
        for e in alice.fine_tuning.jobs.list_events(qlora.id, limit=100).data
        if e.type == "metrics" and "valid_loss" in e.data
    ]
    assert len(valid) == 1 and valid[0] > 0
    assert alice.fine_tuning.jobs.checkpoints.list(qlora.id).data[0].metrics.valid_loss == pytest.approx(valid[0])
    assert qlora.model_extra["tunedock"]["metrics"]["eval_loss"] == pytest.approx(valid[0])
    # The extraction's events follow a Full job's own.
    full = alice.fine_tuning.jobs.list_events(finished[0]["full"].id, limit=200).data
    assert full[0].message.startswith("extraction: ") and any(not e.message.startswith("extraction") for e in full)


def test_jobs_list_pages_and_are_the_jobs_grpc_sees(alice, finished, stack):
    done = finished[0]
    listed = alice.fine_tuning.jobs.list(limit=100).data
    ids = [j.id for j in listed]
    assert set(ids) >= {j.id for j in done.values()}
    assert not any(i.endswith("-lora") for i in ids)  # an extraction is part of its job, not listed apart
    first = alice.fine_tuning.jobs.list(limit=1)
    assert first.has_more and alice.fine_tuning.jobs.list(limit=1, after=first.data[0].id).data[0].id == ids[1]
    with TrainerClient(stack.trainer.address, token=stack.user_tokens["alice"]) as grpc_client:
        grpc_job = grpc_client.get(done["qlora"].id)
    assert grpc_job.state == pb.JOB_STATE_SUCCEEDED and grpc_job.output_ref == done["qlora"].fine_tuned_model


def test_cancel_a_running_job(alice, training_file, stack):
    file, _ = training_file
    method = {"type": "lora", "lora": {"hyperparameters": {"max_steps": 2000, "batch_size": 1}}}
    job = alice.fine_tuning.jobs.create(model="auto", training_file=file.id, method=method)
    wait(alice, job.id, until=("running",))
    cancelled = alice.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    assert alice.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="already ended"):
        alice.fine_tuning.jobs.cancel(job.id)
    with TrainerClient(stack.trainer.address, token=stack.user_tokens["alice"]) as grpc_client:
        assert grpc_client.get(job.id).state == pb.JOB_STATE_CANCELLED


def test_another_projects_jobs_and_files_are_not_found(stack, alice, finished, training_file):
    job = finished[0]["supervised"]
    with openai_client(stack, "bob") as bob:
        for call in (
            lambda: bob.fine_tuning.jobs.retrieve(job.id),
            lambda: bob.fine_tuning.jobs.cancel(job.id),
            lambda: bob.fine_tuning.jobs.list_events(job.id),
            lambda: bob.files.retrieve(training_file[0].id),
            lambda: bob.files.content(training_file[0].id),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        assert job.id not in [j.id for j in bob.fine_tuning.jobs.list(limit=100).data]
        with pytest.raises(openai.NotFoundError):  # bob's job on alice's file: as if there were none
            bob.fine_tuning.jobs.create(model="auto", training_file=training_file[0].id)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.base_url, api_key="td-not-a-token", max_retries=0).fine_tuning.jobs.list()


def test_a_file_in_use_cannot_be_deleted_and_one_that_is_not_can(alice, tmp_path):
    path = tmp_path / "spare.jsonl"
    path.write_bytes(memorization_jsonl(4))
    with path.open("rb") as fh:
        spare = alice.files.create(file=fh, purpose="fine-tune")
    assert alice.files.delete(spare.id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(spare.id)


def test_the_node_openai_package_creates_and_follows_a_job(stack, training_file):
    npm, node = shutil.which("npm"), shutil.which("node")
    assert npm and node, "Node.js and npm are needed to run clients/node (.ci/run has them)"
    if not (NODE_CLIENT / "node_modules" / "openai").exists():
        subprocess.run([npm, "ci", "--silent", "--no-audit", "--no-fund"], cwd=NODE_CLIENT, check=True, timeout=300)
    env = {
        "PATH": str(Path(node).parent),
        "TUNEDOCK_OPENAI_BASE_URL": stack.base_url,
        "TUNEDOCK_TOKEN": stack.user_tokens["alice"],
        "TUNEDOCK_MAX_STEPS": "2",
    }
    run = subprocess.run(
        [node, "openai_fine_tune.mjs", str(training_file[1])],
        cwd=NODE_CLIENT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["status"] == "succeeded" and result["fine_tuned_model"].endswith(":1")
    assert result["steps"] == [1, 2] and result["reply_model"] == result["fine_tuned_model"]
    assert result["completion_tokens"] > 0
