"""The session's fine-tuning stack: registry, trainer (real workers, its OpenAI fine-tuning API) and
inference (the session's vLLM engine) with authentication on, behind one base URL; and one job per
method, trained once for the Python client's tests and the console's."""

from __future__ import annotations

import time

import pytest

ROLES = ["trainer.submit", "trainer.read", "registry.read", "inference.generate"]
FAST = {"max_steps": 3, "batch_size": 4, "max_seq_length": 128}
METHODS = {
    "supervised": {"type": "supervised", "supervised": {"hyperparameters": FAST}},
    "qlora": {"type": "qlora", "qlora": {"r": 4, "hyperparameters": FAST}},
    "full": {"type": "full", "full": {"hyperparameters": FAST}},
    "freeze": {"type": "freeze", "freeze": {"trainable_layers": 1, "hyperparameters": FAST, "extract": {"rank": 8}}},
}


@pytest.fixture(scope="session")
def fine_tuning_stack(tmp_path_factory, tiny_model_dir, inference_stack):
    """Inference's HTTP port serves generation and the console and forwards /v1/files and /v1/fine_tuning to
    the trainer, as `tunedock up` arranges; alice (team-a), bob (team-b) and carol (team-a's admin) use it."""
    from tests.common.secured import SecuredServices

    users = {
        "alice": (ROLES, ["team-a"]),
        "bob": (ROLES, ["team-b"]),
        "carol": ([*ROLES, "registry.admin"], ["team-a"]),  # may move team-a's aliases
    }
    services = SecuredServices(
        tmp_path_factory.mktemp("fine-tuning"),
        tiny_model_dir,
        inference_stack,
        users,
        trainer_http=True,
        max_concurrent_jobs=2,
        http_port=0,
    )
    services.origin = f"http://127.0.0.1:{services.inference.server.http_port}"
    services.base_url = services.origin + "/v1"
    with openai_client(services) as c:
        services.base_id = c.models.list().data[0].id
    yield services
    services.stop()


def openai_client(stack, user: str = "alice"):
    import openai

    return openai.OpenAI(base_url=stack.base_url, api_key=stack.user_tokens[user], max_retries=0)


def wait(c, job_id: str, timeout: float = 600.0, until=("succeeded", "failed", "cancelled")):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        time.sleep(0.5)
    raise AssertionError(f"{job_id} still {job.status} after {timeout:.0f} s")


@pytest.fixture(scope="session")
def training_file(fine_tuning_stack, tmp_path_factory):
    """alice's file of 8 pirate records: (the OpenAI file object, its path)."""
    from tests.trainer.conftest import memorization_jsonl

    path = tmp_path_factory.mktemp("files") / "pirate.jsonl"
    path.write_bytes(memorization_jsonl())
    with openai_client(fine_tuning_stack) as alice, path.open("rb") as fh:
        return alice.files.create(file=fh, purpose="fine-tune"), path


@pytest.fixture(scope="session")
def four_methods(fine_tuning_stack, training_file):
    """One of alice's jobs per method (supervised is LoRA), created together (two train at once) and followed
    to the end: ({name: finished job}, {name: job as created})."""
    file, _ = training_file
    with openai_client(fine_tuning_stack) as alice:
        created = {
            name: alice.fine_tuning.jobs.create(
                model=fine_tuning_stack.base_id,
                training_file=file.id,
                validation_file=file.id if name == "qlora" else None,  # eval loss in its events and checkpoints
                method=method,
                suffix=f"pirate-{name}",
                seed=7,
            )
            for name, method in METHODS.items()
        }
        return {name: wait(alice, job.id) for name, job in created.items()}, created
