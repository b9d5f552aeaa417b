"""OpenAI fine-tuning requests as JobSpecs and TuneDock records as OpenAI objects (no server)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.trainer import openai_jobs as oj
from services.trainer.domain import CheckpointEvent, EvalEvent, JobEvent, ProgressEvent, StateEvent
from services.trainer.store import JobRecord
from tunedock.errors import InvalidArgument
from tunedock.jobs import DEFAULTS

BASE = "/models/tiny-llama"


def spec(**body):
    return oj.job_spec({"model": "tiny-llama", "training_file": "ds-1", **body}, BASE, "")


def test_supervised_trains_the_default_method_and_auto_takes_tunedocks_defaults():
    s = spec(method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "auto", "batch_size": 8}}})
    assert s.method.kind == oj.DEFAULT_METHOD == "lora"
    assert s.base_model == ""  # the served base's id is the trainer's default base
    assert s.hyperparameters.epochs == 0 and s.hyperparameters.batch_size == 8
    assert s.then_extract is None and s.output_name.startswith("ft-lora-")


def test_each_of_the_four_methods_with_its_knobs():
    q = spec(method={"type": "qlora", "qlora": {"r": 4, "quant_type": "fp4", "hyperparameters": {"max_steps": 3}}})
    assert q.method.qlora.lora.r == 4 and q.method.qlora.quant_type == "fp4" and q.hyperparameters.max_steps == 3
    f = spec(method={"type": "freeze", "freeze": {"trainable_layers": 1, "extract": {"rank": 8}}}, suffix="Bot")
    assert f.method.freeze.trainable_layers == 1 and f.then_extract.rank == 8 and f.output_name == "bot"
    assert spec(method={"type": "freeze"}).method.freeze.trainable_layers == DEFAULTS.trainable_layers
    full = spec(method={"type": "full", "full": {}})
    assert full.method.full is not None and full.then_extract.allow_dropped  # servable through its adapter
    lora = spec(method={"type": "lora", "lora": {"r": 16, "hyperparameters": {"learning_rate_multiplier": 2}}})
    assert lora.method.lora.r == 16 and lora.hyperparameters.learning_rate == pytest.approx(
        2 * DEFAULTS.adapter_learning_rate
    )


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"method": {"type": "dpo", "dpo": {}}}, "method.type", "supervised, full, freeze, lora, qlora"),
        ({"method": {"type": "lora", "lora": {"rank": 4}}}, "method.lora.rank", "knobs: r, alpha"),
        ({"method": {"type": "lora", "lora": {"extract": {"rank": 4}}}}, "method.lora.extract", "serves as trained"),
        ({"hyperparameters": {"n_epochs": -1}}, "hyperparameters.n_epochs", "above 0"),
        ({"hyperparameters": {"epochz": 1}}, "hyperparameters.epochz", "known: n_epochs"),
        ({"hyperparameters": {"learning_rate_multiplier": 2, "learning_rate": 1e-4}}, None, "not both"),
        ({"training_file": ""}, "training_file", "required"),
        ({"integrations": [{"type": "wandb"}]}, "integrations", "not supported"),
        ({"seed": "7"}, "seed", "integer"),
        ({"fine_tune_everything": True}, "fine_tune_everything", "unknown field"),
    ],
)
def test_refusals_name_the_field(body, param, says):
    with pytest.raises(InvalidArgument) as caught:
        spec(**body)
    assert says in caught.value.message
    if param:
        assert caught.value.param == param


def _job(state="running", then_extract=False, **fields) -> JobRecord:
    s = spec(method={"type": "full" if then_extract else "lora"})
    now = datetime.now(UTC)
    values = dict(
        id="job-1",
        spec=s,
        state=state,
        error="",
        step=2,
        total_steps=4,
        attempt=1,
        output_ref="",
        metrics={},
        cancel_requested=False,
        created_at=now,
        started_at=now,
        ended_at=None,
        project="team-a",
        failures=0,
    )
    values.update(fields)
    return JobRecord(**values)


def test_a_full_job_is_running_until_its_extraction_ends_and_serves_the_adapter():
    trained = _job("succeeded", then_extract=True, output_ref="bot:1", ended_at=datetime.now(UTC))
    assert oj.job_object(trained)["status"] == "running" and oj.job_object(trained)["fine_tuned_model"] is None
    extracting = _job("running", id="job-1-lora")
    assert oj.job_object(trained, extracting)["status"] == "running"
    done = _job("succeeded", id="job-1-lora", output_ref="bot-lora:1", metrics={"extract_rank": 8.0})
    obj = oj.job_object(trained, done)
    assert obj["status"] == "succeeded" and obj["fine_tuned_model"] == "bot-lora:1"
    assert obj["tunedock"]["extraction"]["metrics"] == {"extract_rank": 8.0}
    failed = _job("failed", id="job-1-lora", error="rank too high")
    assert oj.job_object(trained, failed)["error"] == {
        "code": "extraction_failed",
        "message": "rank too high",
        "param": None,
    }


def test_status_names_and_estimated_finish():
    assert oj.job_object(_job("validating"))["status"] == "validating_files"
    running = oj.job_object(_job("running"))
    assert running["estimated_finish"] is not None and running["fine_tuned_model"] is None


def _event(seq: int, **payload) -> JobEvent:
    return JobEvent(sequence=seq, time=datetime.now(UTC), **payload)


def test_events_checkpoints_and_the_results_csv():
    events = [
        _event(1, state=StateEvent(state="running")),
        _event(2, progress=ProgressEvent(step=1, total_steps=2, loss=2.5, learning_rate=1e-4)),
        _event(3, checkpoint=CheckpointEvent(step=1)),
        _event(4, progress=ProgressEvent(step=2, total_steps=2, loss=1.5, learning_rate=5e-5)),
        _event(5, eval=EvalEvent(step=2, eval_loss=1.75)),
    ]
    metrics = oj.event_object("job-1", events[1])
    assert metrics["type"] == "metrics" and metrics["data"]["train_loss"] == 2.5 and metrics["id"] == "ftevent-job-1-2"
    assert oj.parse_event_id(metrics["id"]) == ("job-1", 2)
    with pytest.raises(InvalidArgument):
        oj.parse_event_id("evt-2")
    job = _job("succeeded", step=2, total_steps=2, output_ref="bot:1")
    found = oj.checkpoints(job, events, "bot:1")
    assert [c["step_number"] for c in found] == [2, 1]
    assert found[0]["fine_tuned_model_checkpoint"] == "bot:1" and found[0]["metrics"] == {
        "step": 2,
        "train_loss": 1.5,
        "valid_loss": 1.75,
    }
    assert found[1]["metrics"] == {"step": 1, "train_loss": 2.5}
    rows = oj.results_csv(events).decode().splitlines()
    assert rows[0].startswith("step,train_loss,valid_loss") and rows[2].startswith("2,1.5,1.75")


def test_an_upload_over_the_limit_is_refused_by_its_declared_length_before_it_is_spooled():
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from services.trainer.openai_api import FineTuningFront, build_app

    front = FineTuningFront(core=SimpleNamespace(max_dataset_bytes=1 << 10), authenticator=None)  # type: ignore[arg-type]
    with TestClient(build_app(front)) as http:
        answer = http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("big.jsonl", b"x" * 200_000)})
    assert answer.status_code == 429 and answer.json()["error"]["type"] == "rate_limit_error"
    assert "--max-dataset-mb" in answer.json()["error"]["message"]
