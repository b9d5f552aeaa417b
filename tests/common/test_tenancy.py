"""Projects, worker tokens and the audit log through real servers with authentication on.

Registry, trainer (with real worker subprocesses) and inference (the session's vLLM
engine) share one token file and worker key, as a deployment would.
"""

from __future__ import annotations

import logging

import grpc
import pytest

from services.common.auth import WorkerTokens
from tests.common.secured import SecuredServices
from tests.trainer.conftest import memorization_jsonl
from tunedock.client import InferenceClient, RegistryClient, TrainerClient
from tunedock.tokenfile import load_key
from tunedock.v1 import adapter_registry_pb2, common_pb2, trainer_pb2_grpc
from tunedock.v1 import trainer_pb2 as pb

USER_ROLES = [
    "trainer.submit",
    "trainer.read",
    "registry.read",
    "registry.publish",
    "registry.admin",
    "inference.generate",
]


@pytest.fixture(scope="module")
def secure(tmp_path_factory, tiny_model_dir, inference_stack):
    users = {
        "alice": (USER_ROLES, ["team-a"]),
        "bob": (USER_ROLES, ["team-b"]),
        "carol": (["registry.read"], ["team-a"]),  # may look, may not generate
    }
    stack = SecuredServices(
        tmp_path_factory.mktemp("secure"), tiny_model_dir, inference_stack, users, max_tokens_limit=16, http_port=0
    )
    stack.alice, stack.bob = stack.user_tokens["alice"], stack.user_tokens["bob"]
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def caplog_module():
    """Audit lines of the whole module (caplog is per test)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    audit = logging.getLogger("tunedock.audit")
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)
    yield records
    audit.removeHandler(handler)


@pytest.fixture(scope="module")
def alice_job(secure, tiny_model_dir, tmp_path_factory, caplog_module):
    path = tmp_path_factory.mktemp("data") / "pirate.jsonl"
    path.write_bytes(memorization_jsonl())
    with TrainerClient(secure.trainer.address, token=secure.alice) as alice:
        dataset = alice.upload_dataset(path)
        job = alice.submit(
            pb.JobSpec(
                base_model=str(tiny_model_dir),
                method=common_pb2.MethodConfig(lora=common_pb2.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])),
                train_dataset_ids=[dataset.id],
                output_name="alice-pirate",
                hyperparameters=pb.Hyperparameters(max_steps=4, batch_size=4, learning_rate=2e-3),
            )
        )
        done = alice.wait(job.id, timeout=600)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    return dataset, done


def test_the_worker_published_into_the_jobs_project(secure, alice_job):
    dataset, job = alice_job
    assert dataset.project == "team-a" and job.spec.project == "team-a"
    with RegistryClient(secure.registry.address, token=secure.alice) as alice:
        version = alice.get(job.output_ref)
    assert version.project == "team-a" and version.lineage.job_id == job.id
    assert version.kind == adapter_registry_pb2.ARTIFACT_KIND_LORA_ADAPTER


def _same_answer(call_hidden, hidden: str, call_missing, missing: str) -> str:
    """Both calls fail NOT_FOUND with the same message once the names are swapped."""
    answers = []
    for call, name in ((call_hidden, hidden), (call_missing, missing)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        answers.append(info.value.details().replace(name, "<NAME>"))
    assert answers[0] == answers[1]
    return answers[0]


def test_cross_project_reads_look_like_missing_items(secure, alice_job):
    dataset, job = alice_job
    with (
        TrainerClient(secure.trainer.address, token=secure.bob) as bob,
        RegistryClient(secure.registry.address, token=secure.bob) as bob_registry,
    ):
        _same_answer(lambda: bob.get(job.id), job.id, lambda: bob.get("job-000000000000"), "job-000000000000")
        _same_answer(
            lambda: bob.get_dataset(dataset.id),
            dataset.id,
            lambda: bob.get_dataset("ds-000000000000000000000000"),
            "ds-000000000000000000000000",
        )
        assert [j.id for j in bob.list()] == []
        assert list(bob.list_datasets()) == []
        name = job.output_ref.split(":")[0]
        _same_answer(
            lambda: bob_registry.get(job.output_ref), name, lambda: bob_registry.get("no-such-thing:1"), "no-such-thing"
        )
        assert [a.name for a in bob_registry.list_artifacts()] == []
        with pytest.raises(grpc.RpcError) as info:
            bob.cancel(job.id)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # Bob cannot train on Alice's data either.
        spec = pb.JobSpec(
            base_model=job.spec.base_model,
            method=job.spec.method,
            train_dataset_ids=[dataset.id],
            output_name="bob-steals",
        )
        with pytest.raises(grpc.RpcError) as info:
            bob.submit(spec)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and dataset.id in info.value.details()
    with RegistryClient(secure.registry.address, token=secure.alice) as alice_registry:
        assert [a.name for a in alice_registry.list_artifacts()] == ["alice-pirate"]


def test_cross_project_adapter_use_is_indistinguishable_from_not_found(secure, alice_job):
    _, job = alice_job
    with InferenceClient(secure.inference.address, token=secure.alice) as alice:
        reply = alice.generate("Ahoy", adapter=job.output_ref, max_tokens=4)
        assert reply.adapter_version == job.output_ref
    with InferenceClient(secure.inference.address, token=secure.bob) as bob:
        name = job.output_ref.split(":")[0]
        message = _same_answer(
            lambda: bob.generate("Ahoy", adapter=job.output_ref, max_tokens=4),
            name,
            lambda: bob.generate("Ahoy", adapter="ghost-adapter:1", max_tokens=4),
            "ghost-adapter",
        )
        assert "not found" in message
        assert bob.generate("Ahoy", max_tokens=4).completions  # the base model is everyone's


def test_the_openai_api_takes_tokens_as_api_keys_and_keeps_projects_apart(secure, alice_job):
    """The same tokens, roles and projects over HTTP, with the OpenAI SDK's typed errors."""
    import httpx
    import openai

    _, job = alice_job
    url = f"http://127.0.0.1:{secure.inference.server.http_port}/v1"

    def client(token: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=url, api_key=token, max_retries=0)

    ask = dict(messages=[{"role": "user", "content": "Ahoy"}], max_tokens=4, temperature=0)
    with client(secure.alice) as alice, client(secure.bob) as bob:
        assert alice.chat.completions.create(model=job.output_ref, **ask).model == job.output_ref
        assert "alice-pirate" in {m.id for m in alice.models.list().data}
        assert not {m.id for m in bob.models.list().data if m.id.startswith("alice-pirate")}
        with pytest.raises(openai.NotFoundError) as hidden:
            bob.chat.completions.create(model=job.output_ref, **ask)
        with pytest.raises(openai.NotFoundError) as missing:
            bob.chat.completions.create(model="ghost-adapter:1", **ask)
        assert hidden.value.message.replace("alice-pirate", "X") == missing.value.message.replace("ghost-adapter", "X")
        with pytest.raises(openai.NotFoundError):
            bob.models.retrieve(job.output_ref)
        base = bob.models.list().data[0].id
        assert bob.chat.completions.create(model=base, **ask).choices  # the base model is everyone's
    with client("not-a-token") as stranger, pytest.raises(openai.AuthenticationError) as denied:
        stranger.chat.completions.create(model=job.output_ref, **ask)
    assert "unknown" in denied.value.message and "not-a-token" not in denied.value.message
    anonymous = httpx.post(f"{url}/chat/completions", json={"model": job.output_ref, **ask}, timeout=30)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
    assert "Authorization: Bearer" in anonymous.json()["error"]["message"]
    with client(secure.user_tokens["carol"]) as carol, pytest.raises(openai.PermissionDeniedError) as no_role:
        carol.chat.completions.create(model=job.output_ref, **ask)
    assert "inference.generate" in no_role.value.message


def test_a_worker_token_is_good_for_its_own_job_only(secure, alice_job):
    _, job = alice_job
    token = WorkerTokens(load_key(secure.key)).issue(job.id, job.attempt, "team-a", ("alice-pirate",), ttl_s=60)
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(secure.trainer.server.address_of("worker")) as channel:
        worker = trainer_pb2_grpc.TrainerWorkerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            worker.GetAssignment(pb.GetAssignmentRequest(job_id="job-someoneelse"), metadata=metadata, timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"this worker token is for job {job.id}" in info.value.details()
        event = pb.JobEvent(log=pb.LogEvent(message="forged"))
        with pytest.raises(grpc.RpcError) as info:
            worker.ReportEvent(pb.ReportEventRequest(job_id="job-x", attempt=1, event=event), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with TrainerClient(secure.trainer.address, token=token) as as_worker, pytest.raises(grpc.RpcError) as info:
        list(as_worker.list())
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "trainer.read" in info.value.details()
    out = secure.tokens.parent / "worker-out"
    out.mkdir(exist_ok=True)
    (out / "notes.txt").write_text("not an adapter")
    with RegistryClient(secure.registry.address, token=token) as registry, pytest.raises(grpc.RpcError) as info:
        registry.publish_dir(out, "someone-elses-name")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may publish only alice-pirate" in info.value.details()


def test_audit_lines_say_who_did_what(secure, alice_job, caplog_module):
    dataset, job = alice_job
    with RegistryClient(secure.registry.address, token=secure.alice) as alice:
        alice.set_alias("alice-pirate", "prod", 1)
    with TrainerClient(secure.trainer.address, token=secure.alice) as alice:
        cancelled = alice.submit(
            pb.JobSpec(
                base_model=job.spec.base_model,
                method=job.spec.method,
                train_dataset_ids=[dataset.id],
                output_name="alice-second",
                hyperparameters=pb.Hyperparameters(max_steps=500),
            )
        )
        alice.cancel(cancelled.id)
    lines = [(r.principal, r.action, r.target, r.project) for r in caplog_module]
    assert ("alice", "trainer.upload_dataset", dataset.id, "team-a") in lines
    assert ("alice", "trainer.submit", job.id, "team-a") in lines
    assert (f"worker:{job.id}", "registry.publish", "alice-pirate:1", "team-a") in lines
    assert ("alice", "registry.alias", "alice-pirate@prod", "team-a") in lines
    assert ("alice", "trainer.cancel", cancelled.id, "team-a") in lines
    assert all(r.audit is True and r.created > 0 for r in caplog_module)


def test_writing_into_another_project_is_refused_and_stores_nothing(secure, alice_job, tmp_path):
    dataset, job = alice_job
    with RegistryClient(secure.registry.address, token=secure.alice) as alice:
        alice.download(job.output_ref, tmp_path / "adapter")
    with RegistryClient(secure.registry.address, token=secure.bob) as bob:
        with pytest.raises(grpc.RpcError) as info:
            bob.publish_dir(tmp_path / "adapter", "bob-copy", project="team-a")
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert info.value.details() == "bob may not use project 'team-a'"
        with pytest.raises(grpc.RpcError) as info:
            bob.publish_dir(tmp_path / "adapter", "alice-pirate")  # a name another project holds
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "is taken; publish under another name" in info.value.details()
        assert list(bob.list_artifacts()) == []
    with RegistryClient(secure.registry.address, token=secure.alice) as alice:
        assert [v.version for v in alice.list_versions("alice-pirate")] == [1]  # nothing added to Alice's either
    with TrainerClient(secure.trainer.address, token=secure.bob) as bob:
        spec = pb.JobSpec(
            base_model=job.spec.base_model,
            method=job.spec.method,
            train_dataset_ids=[dataset.id],
            output_name="bob-job",
            project="team-a",
        )
        with pytest.raises(grpc.RpcError) as info:
            bob.submit(spec)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert list(bob.list()) == []
