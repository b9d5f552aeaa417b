"""The trainer through real gRPC servers (trainer + registry on port 0) and real worker subprocesses."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from services.adapter_registry.server import build_server as build_registry
from services.adapter_registry.settings import RegistrySettings
from services.common.server_thread import ServerThread
from services.trainer.server import build_server as build_trainer
from services.trainer.settings import TrainerSettings
from tests.trainer.conftest import memorization_jsonl
from tunedock.client import RegistryClient, TrainerClient
from tunedock.v1 import adapter_registry_pb2, common_pb2
from tunedock.v1 import trainer_pb2 as pb


class Stack:
    def __init__(self, data_dir, max_concurrent=2, **trainer_settings):
        self.data_dir = data_dir
        self.max_concurrent = max_concurrent
        self.trainer_settings = trainer_settings
        self.registry_settings = RegistrySettings(port=0, metrics_port=-1, data_dir=data_dir / "registry")
        self.registry = ServerThread(lambda: build_registry(self.registry_settings))
        self.start_trainer()

    def start_trainer(self):
        settings = TrainerSettings(
            port=0,
            worker_port=0,
            metrics_port=-1,
            data_dir=self.data_dir,
            max_attempts=3,
            registry_address=self.registry.address,
            max_concurrent_jobs=self.max_concurrent,
            **self.trainer_settings,
        )
        self.trainer = ServerThread(lambda: build_trainer(settings))
        self.client = TrainerClient(self.trainer.address, timeout=30)

    def restart_registry(self):
        """The registry again, on the same port and data (after `registry.stop()`)."""
        self.registry_settings.port = int(self.registry.address.rsplit(":", 1)[1])
        self.registry = ServerThread(lambda: build_registry(self.registry_settings))

    @property
    def core(self):
        return self.trainer.server.bindings[0].servicer.core

    def stop(self):
        self.client.close()
        self.trainer.stop(grace=1)
        self.registry.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("trainer"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def dataset(stack, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pirate.jsonl"
    path.write_bytes(memorization_jsonl())
    return stack.client.upload_dataset(path)


def _spec(base, dataset_id, name, method: common_pb2.MethodConfig, **hyper) -> pb.JobSpec:
    hyper = {"max_steps": 16, "learning_rate": 2e-3, "log_every_steps": 4, "batch_size": 4} | hyper
    return pb.JobSpec(
        base_model=str(base),
        method=method,
        train_dataset_ids=[dataset_id],
        output_name=name,
        validation_split=0.25,
        hyperparameters=pb.Hyperparameters(**hyper),
        labels=[common_pb2.Label(key="suite", value="trainer")],
    )


METHODS = {
    "full": common_pb2.MethodConfig(full=common_pb2.FullConfig()),
    "freeze": common_pb2.MethodConfig(freeze=common_pb2.FreezeConfig(trainable_layers=1)),
    "lora": common_pb2.MethodConfig(lora=common_pb2.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])),
    "qlora": common_pb2.MethodConfig(qlora=common_pb2.QLoraConfig(lora=common_pb2.LoraConfig(r=4))),
}
KINDS = {
    "full": adapter_registry_pb2.ARTIFACT_KIND_MODEL,
    "freeze": adapter_registry_pb2.ARTIFACT_KIND_DELTA,
    "lora": adapter_registry_pb2.ARTIFACT_KIND_LORA_ADAPTER,
    "qlora": adapter_registry_pb2.ARTIFACT_KIND_LORA_ADAPTER,
}


def test_upload_is_content_addressed_and_validated(stack, dataset, tmp_path):
    assert dataset.id.startswith("ds-") and dataset.num_records == 8 and dataset.format == pb.DATASET_FORMAT_ALPACA
    again = tmp_path / "same.jsonl"
    again.write_bytes(memorization_jsonl())
    assert stack.client.upload_dataset(again).id == dataset.id
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n')
    with pytest.raises(grpc.RpcError) as info:
        stack.client.upload_dataset(bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "line 2: field 'output' must be a non-empty string"


def test_a_succeeded_jobs_checkpoints_keep_the_newest_k_and_are_counted(stack, monkeypatch):
    folder = stack.data_dir / "trainer" / "checkpoints" / "job-prune-me"
    for name in ("step-00000010", "step-00000020", "step-00000030", "final/output"):
        (folder / name).mkdir(parents=True)
        (folder / name / "weights.pt").write_bytes(b"w" * 1000)
    cache = stack.data_dir / "trainer" / "checkpoints" / "tokens"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "big.bin").write_bytes(b"t" * 5000)  # a node cache: not a job's checkpoint
    before = stack.core.checkpoint_bytes()
    assert before >= 4000
    monkeypatch.setattr(stack.core, "checkpoints_kept", 1)
    stack.core.prune_checkpoints("job-prune-me")
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000030"]
    assert stack.core.checkpoint_bytes() == before - 3000
    monkeypatch.setattr(stack.core, "checkpoints_kept", 0)
    stack.core.prune_checkpoints("job-prune-me")
    assert not folder.exists() and (cache / "big.bin").exists()


@pytest.mark.parametrize("token", ["²", "٣", "1²", "-1", "1e3", "9" * 40])
def test_page_tokens_are_ascii_numbers(stack, token):
    """A page token that is not one the server issued is INVALID_ARGUMENT, never INTERNAL (int('²') raises)."""
    for call in (
        lambda: stack.client.stub.ListJobs(pb.ListJobsRequest(page_token=token)),
        lambda: stack.client.stub.ListDatasets(pb.ListDatasetsRequest(page_token=token)),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in info.value.details()


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_and_publishes(stack, dataset, tiny_model_dir, method):
    job = stack.client.submit(_spec(tiny_model_dir, dataset.id, f"svc-{method}", METHODS[method]))
    assert job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
    events = list(stack.client.watch(job.id, timeout=300))
    kinds = [e.WhichOneof("event") for e in events]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    done = stack.client.get(job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    losses = [e.progress.loss for e in events if e.HasField("progress")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert "eval" in kinds and kinds[-1] == "state"
    assert done.output_ref == f"svc-{method}:1"
    metrics = {m.name: m.value for m in done.metrics}
    assert {"train_loss", "eval_loss", "peak_memory_bytes", "wall_time_s", "trainable_params"} <= set(metrics)
    with RegistryClient(stack.registry.address) as registry:
        version = registry.get(done.output_ref)
    assert version.kind == KINDS[method]
    assert version.lineage.job_id == job.id and list(version.lineage.dataset_ids) == [dataset.id]
    assert version.lineage.base_model == str(tiny_model_dir) and version.lineage.base_fingerprint
    assert version.lineage.method_config == METHODS[method]
    assert version.lineage.hyperparameters["max_steps"] == 16
    # A late watcher gets the whole history replayed.
    assert [e.sequence for e in stack.client.watch(job.id, timeout=30)] == [e.sequence for e in events]


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        (
            lambda s: s.method.lora.target_modules.append("wq"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown LoRA target module(s) ['wq']",
        ),
        (
            lambda s: s.method.lora.__setattr__("r", 0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "LoRA rank r must be > 0, got 0",
        ),
        (
            lambda s: s.method.freeze.__setattr__("trainable_layers", 5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "freeze: trainable_layers=5 but this model has 2 layers",
        ),
        (
            lambda s: s.method.freeze.trainable_layer_indices.append(7),
            grpc.StatusCode.INVALID_ARGUMENT,
            "freeze: layer indices [7] are out of range",
        ),
        (
            lambda s: s.__setattr__("base_model", "/no/such/model"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "base model '/no/such/model' not found",
        ),
        (
            lambda s: s.train_dataset_ids.__setitem__(0, "ds-missing"),
            grpc.StatusCode.NOT_FOUND,
            "dataset 'ds-missing' not found",
        ),
        (lambda s: s.ClearField("method"), grpc.StatusCode.INVALID_ARGUMENT, "method is required"),
        (lambda s: s.__setattr__("output_name", "Bad Name"), grpc.StatusCode.INVALID_ARGUMENT, "invalid artifact name"),
    ],
)
def test_bad_specs_are_refused_at_validation(stack, dataset, tiny_model_dir, change, code, message):
    method = common_pb2.MethodConfig(lora=common_pb2.LoraConfig(r=4))
    if "freeze" in message:
        method = common_pb2.MethodConfig(freeze=common_pb2.FreezeConfig(trainable_layers=1))
    spec = _spec(tiny_model_dir, dataset.id, "refused", method)
    change(spec)
    before = len(list(stack.client.list()))
    with pytest.raises(grpc.RpcError) as info:
        stack.client.submit(spec)
    assert info.value.code() == code
    assert message in info.value.details()
    assert len(list(stack.client.list())) == before


def _wait_for(events, predicate, timeout=120):
    deadline = time.monotonic() + timeout
    for event in events:
        if predicate(event):
            return event
        assert time.monotonic() < deadline
    raise AssertionError("stream ended before the event came")


@pytest.mark.slow
def test_cancel_mid_run(stack, dataset, tiny_model_dir):
    spec = _spec(tiny_model_dir, dataset.id, "svc-cancel", METHODS["lora"], max_steps=5000, log_every_steps=1)
    job = stack.client.submit(spec)
    _wait_for(stack.client.watch(job.id, timeout=120), lambda e: e.HasField("progress"))
    proc = stack.core.executor.processes[job.id]
    started = time.monotonic()
    cancelled = stack.client.cancel(job.id)
    assert cancelled.state == pb.JOB_STATE_CANCELLED
    deadline = time.monotonic() + 10
    while proc.returncode is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.returncode is not None and time.monotonic() - started < 10
    with pytest.raises(OSError):
        os.killpg(proc.pid, 0)  # the whole process group is gone
    time.sleep(1)
    assert stack.client.get(job.id).state == pb.JOB_STATE_CANCELLED
    with RegistryClient(stack.registry.address) as registry, pytest.raises(grpc.RpcError) as info:
        registry.resolve("svc-cancel")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        stack.client.cancel(job.id)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.slow
def test_killed_worker_resumes_from_its_checkpoint(stack, dataset, tiny_model_dir):
    spec = _spec(
        tiny_model_dir,
        dataset.id,
        "svc-resume",
        METHODS["lora"],
        max_steps=40,
        log_every_steps=1,
        checkpoint_every_steps=10,
    )
    job = stack.client.submit(spec)
    checkpoint = _wait_for(stack.client.watch(job.id, timeout=120), lambda e: e.HasField("checkpoint"))
    os.kill(stack.core.executor.processes[job.id].pid, signal.SIGKILL)
    events = list(stack.client.watch(job.id, timeout=300))
    done = stack.client.get(job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.attempt == 2
    messages = [e.state.message for e in events if e.HasField("state")] + [
        e.log.message for e in events if e.HasField("log")
    ]
    assert any("killed by signal 9" in m for m in messages)
    assert any(f"resumed from checkpoint at step {checkpoint.checkpoint.step}" in m for m in messages)
    # After the resume, progress continues from the checkpoint rather than from step 1.
    resumed_at = max(i for i, e in enumerate(events) if e.HasField("log") and "resumed" in e.log.message)
    first_after = next(e.progress.step for e in events[resumed_at:] if e.HasField("progress"))
    assert first_after == checkpoint.checkpoint.step + 1
    # Succeeded and published: its checkpoints leave the trainer's volume once the worker has exited.
    folder = stack.data_dir / "trainer" / "checkpoints" / job.id
    deadline = time.monotonic() + 30
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not folder.exists(), sorted(p.name for p in folder.iterdir())


@pytest.mark.slow
def test_a_worker_exit_the_store_refuses_is_recorded_late_and_health_says_so(
    stack, dataset, tiny_model_dir, monkeypatch
):
    """The store refuses to record a killed worker's exit (a full disk): the monitor keeps trying,
    health is NOT_SERVING meanwhile, and the job is retried with how late it was recorded and why."""
    from tunedock.healthcheck import check_health

    job = stack.client.submit(
        _spec(tiny_model_dir, dataset.id, "svc-late", METHODS["lora"], max_steps=40, log_every_steps=1)
    )
    _wait_for(stack.client.watch(job.id, timeout=120), lambda e: e.HasField("progress"))
    record, refusals, health = stack.core._record_exit, [], []

    async def refusing(*args):
        if len(refusals) < 2:
            refusals.append(args)
            raise OSError(28, "database or disk is full")
        return await record(*args)

    def probe(stop: threading.Event) -> None:
        while not stop.wait(0.2):
            health.append(check_health(stack.trainer.address, "tunedock.v1.TrainerService", timeout=2))

    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(stop,), daemon=True)
    monkeypatch.setattr(stack.core, "_record_exit", refusing)
    prober.start()
    os.kill(stack.core.executor.processes[job.id].pid, signal.SIGKILL)
    events = list(stack.client.watch(job.id, timeout=300))
    stop.set()
    prober.join()
    assert len(refusals) == 2 and "NOT_SERVING" in health and health[-1] == "SERVING", health
    requeued = [e.state.message for e in events if e.HasField("state") and "killed by signal 9" in e.state.message]
    assert requeued and "s late: [Errno 28] database or disk is full" in requeued[0], requeued
    assert stack.client.get(job.id).state == pb.JOB_STATE_SUCCEEDED
    assert check_health(stack.trainer.address, "tunedock.v1.TrainerService", timeout=2) == "SERVING"


@pytest.mark.slow
def test_trainer_restart_mid_queue_loses_nothing(tmp_path, dataset, tiny_model_dir):
    local = Stack(tmp_path, max_concurrent=1)
    try:
        path = tmp_path / "d.jsonl"
        path.write_bytes(memorization_jsonl())
        ds = local.client.upload_dataset(path)
        first = local.client.submit(
            _spec(tiny_model_dir, ds.id, "restart-a", METHODS["lora"], max_steps=60, log_every_steps=1)
        )
        second = local.client.submit(_spec(tiny_model_dir, ds.id, "restart-b", METHODS["lora"]))
        assert local.client.get(second.id).state == pb.JOB_STATE_QUEUED
        _wait_for(local.client.watch(first.id, timeout=120), lambda e: e.HasField("progress"))
        local.client.close()
        local.trainer.stop(grace=1)
        local.start_trainer()
        for job in (first, second):
            done = local.client.wait(job.id, timeout=300)
            assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
        assert {j.id for j in local.client.list()} == {first.id, second.id}
        assert local.client.get(first.id).attempt == 2
        assert local.client.get(first.id).failures == 0  # the restart was ours, not the job's
    finally:
        local.stop()


@pytest.mark.slow
def test_merge_job_equals_base_plus_scaled_BA(stack, tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(4)
    adapter = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
    )
    adapter.save_pretrained(tmp_path / "adapter")
    with RegistryClient(stack.registry.address) as registry:
        registry.publish_dir(
            tmp_path / "adapter",
            "merge-src",
            lineage=adapter_registry_pb2.Lineage(base_model=str(tiny_model_dir), method=common_pb2.METHOD_LORA),
        )
    job = stack.client.submit(pb.JobSpec(merge_adapter="merge-src@latest", output_name="merged-model"))
    done = stack.client.wait(job.id, timeout=300)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    with RegistryClient(stack.registry.address) as registry:
        version = registry.download(done.output_ref, tmp_path / "merged")
    assert version.kind == adapter_registry_pb2.ARTIFACT_KIND_MODEL
    assert {label.key: label.value for label in version.labels}["merged_from"] == "merge-src:1"
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    lora = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    scale = 12 / 4
    checked = 0
    for name, w in base.items():
        module = name.removesuffix(".weight")
        a_key = f"base_model.model.{module}.lora_A.weight"
        if a_key in lora:
            expected = w + scale * lora[f"base_model.model.{module}.lora_B.weight"] @ lora[a_key]
            torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
            checked += 1
        else:
            assert torch.equal(merged[name], w), name
    assert checked == 4  # q_proj and down_proj in both layers


def test_merge_job_of_unknown_adapter_is_refused(stack):
    with pytest.raises(grpc.RpcError) as info:
        stack.client.submit(pb.JobSpec(merge_adapter="no-such-adapter", output_name="x"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "merge_adapter 'no-such-adapter'" in info.value.details()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_train_the_same_output_as_one(stack, dataset, tiny_model_dir, tmp_path, method, monkeypatch):
    """torchrun with 2 gloo processes x batch 2 == 1 process x batch 4 (same global batches, same loss).

    LoRA runs under DDP; Full under FSDP (parameters sharded), as it would on GPUs.
    """
    import torch
    from safetensors.torch import load_file

    monkeypatch.setenv("TUNEDOCK_FSDP_ON_CPU", "1")
    common = dict(max_steps=6, log_every_steps=2, gradient_accumulation_steps=2)
    config = {
        "lora": common_pb2.MethodConfig(
            lora=common_pb2.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
        ),
        "full": METHODS["full"],
    }[method]
    specs = {
        1: _spec(tiny_model_dir, dataset.id, f"dist-{method}-1", config, batch_size=4, **common),
        2: _spec(tiny_model_dir, dataset.id, f"dist-{method}-2", config, batch_size=2, processes_per_node=2, **common),
    }
    adapters = {}
    for n, spec in specs.items():
        spec.validation_split = 0.0
        job = stack.client.submit(spec)
        done = stack.client.wait(job.id, timeout=600)
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
        metrics = {m.name: m.value for m in done.metrics}
        assert metrics.get("processes", 1.0) == n
        with RegistryClient(stack.registry.address) as registry:
            registry.download(done.output_ref, tmp_path / str(n))
        weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
        adapters[n] = load_file(str(tmp_path / str(n) / weights))
    log = (stack.data_dir / "trainer" / "logs" / f"{job.id}.log").read_text()
    assert "rank 1 of 2" in log  # the second job really ran two processes
    assert adapters[1].keys() == adapters[2].keys()
    if method == "lora":
        assert len(adapters[1]) == 12
        for name, tensor in adapters[1].items():
            if "lora_B" in name:
                assert tensor.abs().max() > 0, name  # trained: B starts at zero
    else:
        base = load_file(str(tiny_model_dir / "model.safetensors"))
        name = "model.layers.0.mlp.up_proj.weight"
        assert not torch.equal(adapters[1][name], base[name])
    for name, tensor in adapters[1].items():
        # The tensors agree as a whole to float noise (a wrong split of the batch differs by ~1e-1); single
        # elements may not: Adam divides by sqrt(v), so summation-order noise in a near-zero gradient
        # can move one update by ~1e-5 (seen: relative norms up to 1.7e-5 on LoRA B).
        relative = float((adapters[2][name] - tensor).norm() / tensor.norm().clamp_min(1e-12))
        assert relative < 1e-4, f"{name}: 2 processes differ from 1 by {relative:.2e} (relative norm)"
        torch.testing.assert_close(adapters[2][name], tensor, rtol=1e-4, atol=1e-4)


def test_several_nodes_need_the_kubernetes_executor(stack, dataset, tiny_model_dir):
    spec = _spec(tiny_model_dir, dataset.id, "nodes", METHODS["lora"], nodes=2)
    with pytest.raises(grpc.RpcError) as info:
        stack.client.submit(spec)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "nodes=2 needs the Kubernetes executor" in info.value.details()


def _messages(events) -> list[str]:
    events = list(events)  # a watch is a stream: read it once
    return [e.state.message for e in events if e.HasField("state")] + [
        e.log.message for e in events if e.HasField("log")
    ]


@pytest.mark.slow
def test_a_registry_outage_while_publishing_is_waited_out(tmp_path, tiny_model_dir, monkeypatch):
    """The registry goes away as the job finishes: the attempt gives up (without counting against the job),
    the next attempt publishes the kept output without training again, and exactly one version exists."""
    monkeypatch.setenv("TUNEDOCK_WORKER_PATIENCE_S", "4")  # workers inherit the trainer's environment
    local = Stack(tmp_path, max_concurrent=1)
    try:
        path = tmp_path / "d.jsonl"
        path.write_bytes(memorization_jsonl())
        ds = local.client.upload_dataset(path)
        job = local.client.submit(_spec(tiny_model_dir, ds.id, "outage", METHODS["lora"], max_steps=30))
        _wait_for(local.client.watch(job.id, timeout=120), lambda e: e.HasField("progress") and e.progress.step >= 16)
        local.registry.stop()
        _wait_for(
            local.client.watch(job.id, timeout=120),
            lambda e: e.HasField("state") and "not counted against max_attempts" in e.state.message,
        )
        time.sleep(2)
        local.restart_registry()
        done = local.client.wait(job.id, timeout=300)
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
        assert done.attempt >= 2 and done.failures == 0
        messages = _messages(local.client.watch(job.id))
        assert any("the registry: unavailable" in m for m in messages)
        assert any("finished in an earlier attempt; publishing its output" in m for m in messages)
        assert sum("resumed from checkpoint" in m for m in messages) == 0  # no training the second time
        with RegistryClient(local.registry.address) as registry:
            assert [v.version for v in registry.list_versions("outage")] == [1]
            assert registry.get("outage:1").lineage.job_id == job.id
    finally:
        local.stop()


@pytest.mark.slow
def test_a_job_publishes_one_version_whatever_attempt_publishes(stack, dataset, tiny_model_dir, tmp_path):
    """The worker publishes under the key "job:<id>:output": a version published earlier under that key
    (by an attempt that died before reporting it) is the job's result, and no second one appears."""
    job = stack.client.submit(_spec(tiny_model_dir, dataset.id, "once", METHODS["lora"], max_steps=20))
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "config.json").write_text("{}")
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(earlier / "model.safetensors"))
    with RegistryClient(stack.registry.address) as registry:
        first = registry.publish_dir(earlier, "once", kind="model", idempotency_key=f"job:{job.id}:output")
        done = stack.client.wait(job.id, timeout=300)
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
        assert done.output_ref == "once:1" and first.version.version == 1
        assert [v.version for v in registry.list_versions("once")] == [1]


@pytest.mark.slow
def test_a_superseded_worker_stops_within_seconds(tmp_path, dataset, tiny_model_dir):
    """The trainer moves a job on to a new attempt while the old worker still runs: its next heartbeat is
    refused and it exits at once, instead of training beside the new attempt until its next report."""
    local = Stack(tmp_path, max_concurrent=1)
    try:
        path = tmp_path / "d.jsonl"
        path.write_bytes(memorization_jsonl())
        ds = local.client.upload_dataset(path)
        spec = _spec(tiny_model_dir, ds.id, "superseded", METHODS["lora"], max_steps=4000, log_every_steps=1000)
        job = local.client.submit(spec)
        _wait_for(
            local.client.watch(job.id, timeout=120), lambda e: e.HasField("log") and "parameters train" in e.log.message
        )
        old = local.core.executor.processes[job.id]
        local.trainer.run(local.core.worker_exited(job.id, 1, 1, ""))  # as if attempt 1 had died
        started = time.monotonic()
        while old.returncode is None and time.monotonic() - started < 15:
            time.sleep(0.2)
        assert old.returncode is not None, "the superseded worker is still running"
        assert time.monotonic() - started < 10
        assert local.client.get(job.id).attempt == 2
        local.client.cancel(job.id)
    finally:
        local.stop()


@pytest.mark.slow
def test_a_restarted_trainer_stops_the_workers_it_left_and_charges_no_attempt(tmp_path, tiny_model_dir):
    """A crashed trainer leaves its workers running; the next one stops them before starting new attempts."""
    local = Stack(tmp_path, max_concurrent=1)
    try:
        path = tmp_path / "d.jsonl"
        path.write_bytes(memorization_jsonl())
        ds = local.client.upload_dataset(path)
        job = local.client.submit(_spec(tiny_model_dir, ds.id, "orphan", METHODS["lora"], max_steps=60))
        _wait_for(local.client.watch(job.id, timeout=120), lambda e: e.HasField("progress"))
        executor = local.core.executor
        orphan = executor.processes.pop(job.id)  # a crash: nothing stops the worker on the way down
        for task in list(executor._monitors):
            task.cancel()
        local.client.close()
        local.trainer.stop(grace=1)
        assert orphan.returncode is None  # still training, with no trainer
        local.start_trainer()
        deadline = time.monotonic() + 10
        while _alive(orphan.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(orphan.pid), "the previous trainer's worker kept running"
        done = local.client.wait(job.id, timeout=300)
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
        assert done.attempt == 2 and done.failures == 0
    finally:
        local.stop()


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except OSError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not yet reaped by its parent) is gone
        return stat.read().split()[2] != "Z"


@pytest.mark.slow
def test_workers_get_their_own_gpus_and_wait_for_free_ones(tmp_path, tiny_model_dir):
    """A trainer with a pool of one GPU id runs one job at a time on it, each worker seeing only its device."""
    local = Stack(tmp_path, max_concurrent=2, gpus="7")
    try:
        path = tmp_path / "d.jsonl"
        path.write_bytes(memorization_jsonl())
        ds = local.client.upload_dataset(path)
        first = local.client.submit(_spec(tiny_model_dir, ds.id, "gpu-a", METHODS["lora"], max_steps=30))
        second = local.client.submit(_spec(tiny_model_dir, ds.id, "gpu-b", METHODS["lora"], max_steps=4))
        _wait_for(local.client.watch(first.id, timeout=120), lambda e: e.HasField("progress"))
        proc = local.core.executor.processes[first.id]
        raw = Path(f"/proc/{proc.pid}/environ").read_text()
        environ = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
        assert environ["CUDA_VISIBLE_DEVICES"] == "7"
        assert local.client.get(second.id).state == pb.JOB_STATE_QUEUED  # a slot is free, the GPU is not
        for job in (first, second):
            assert local.client.wait(job.id, timeout=300).state == pb.JOB_STATE_SUCCEEDED
        a, b = local.client.get(first.id), local.client.get(second.id)
        assert b.start_time.ToDatetime() >= a.end_time.ToDatetime()
        spec = _spec(tiny_model_dir, ds.id, "gpu-c", METHODS["lora"], processes_per_node=2)
        with pytest.raises(grpc.RpcError) as info:
            local.client.submit(spec)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "this node has 1" in info.value.details()
    finally:
        local.stop()


@pytest.mark.slow
def test_a_sharded_full_run_resumes_from_its_distributed_checkpoint(
    stack, dataset, tiny_model_dir, tmp_path, monkeypatch
):
    """Full under FSDP (2 gloo processes) writes torch.distributed.checkpoint shards; killed after one, the next
    attempt resumes there and ends at the weights of a run that never stopped."""
    from safetensors.torch import load_file

    monkeypatch.setenv("TUNEDOCK_FSDP_ON_CPU", "1")
    hyper = dict(max_steps=6, log_every_steps=1, checkpoint_every_steps=2, batch_size=2, processes_per_node=2)
    weights = {}
    for name, kill in (("fsdp-whole", False), ("fsdp-killed", True)):
        spec = _spec(tiny_model_dir, dataset.id, name, METHODS["full"], **hyper)
        spec.validation_split = 0.0
        job = stack.client.submit(spec)
        if kill:
            _wait_for(stack.client.watch(job.id, timeout=120), lambda e: e.HasField("checkpoint"))
            os.killpg(stack.core.executor.processes[job.id].pid, signal.SIGKILL)
        done = stack.client.wait(job.id, timeout=600)
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
        if kill:
            assert done.attempt == 2
            logs = [e.log.message for e in stack.client.watch(job.id) if e.HasField("log")]
            assert any(m.startswith("resumed from checkpoint at step") for m in logs), logs
        with RegistryClient(stack.registry.address) as registry:
            registry.download(done.output_ref, tmp_path / name)
        weights[name] = load_file(str(tmp_path / name / "model.safetensors"))
    for key, tensor in weights["fsdp-whole"].items():
        relative = float((weights["fsdp-killed"][key] - tensor).norm() / tensor.norm().clamp_min(1e-12))
        assert relative < 1e-4, (key, relative)


def test_server_info_says_what_the_trainer_offers(stack):
    from tunedock.tiny_model import tiny_model_path

    info = stack.client.info()
    # No default configured: the embedded tiny model, where inference builds it from the same data dir.
    assert info.default_base_model == str(tiny_model_path(cache_dir=stack.data_dir / "models"))
    assert list(info.methods) == ["full", "freeze", "lora", "qlora"]
    assert list(info.dataset_formats) == ["alpaca", "chat", "text"]
    assert set(info.base_model_sources) == {"local-path", "hub-cache", "registry"}
    assert (info.executor, info.multi_node, info.max_concurrent_jobs, info.max_attempts) == ("local", False, 2, 3)
    assert info.device == ("cuda" if info.gpu_count else "cpu")
    assert info.max_dataset_bytes == TrainerSettings().max_dataset_mb * 2**20 and info.max_lora_rank == 64


def test_a_job_without_a_base_trains_on_the_default_and_says_so(tmp_path, tiny_model_dir):
    from services.common.basemodels import base_fingerprint

    served = Stack(tmp_path / "served", default_base_model=str(tiny_model_dir))
    try:
        path = tmp_path / "pirate.jsonl"
        path.write_bytes(memorization_jsonl())
        uploaded = served.client.upload_dataset(path)
        spec = _spec(tiny_model_dir, uploaded.id, "svc-default-base", METHODS["lora"], max_steps=4)
        spec.base_model = ""
        job = served.client.submit(spec)
        events = list(served.client.watch(job.id, timeout=300))
        done = served.client.get(job.id)
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
        assert done.spec.base_model == str(tiny_model_dir) == served.client.info().default_base_model
        said = events[0].state.message
        assert said == f"no base_model given: training on this trainer's default base {tiny_model_dir}"
        with RegistryClient(served.registry.address) as registry:
            lineage = registry.get(done.output_ref).lineage
        assert lineage.base_model == str(tiny_model_dir)
        assert lineage.base_fingerprint == base_fingerprint(str(tiny_model_dir))
    finally:
        served.stop()


def test_the_embedded_default_base_is_built_on_first_use_and_is_the_tiny_model_inference_serves(
    stack, dataset, tiny_model_dir
):
    from services.common.basemodels import base_fingerprint

    spec = _spec(tiny_model_dir, dataset.id, "svc-embedded-base", METHODS["lora"], max_steps=2)
    spec.base_model = ""
    job = stack.client.submit(spec)
    assert list(stack.client.watch(job.id, timeout=300))
    done = stack.client.get(job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.spec.base_model == stack.client.info().default_base_model != str(tiny_model_dir)
    # Built in another directory, from the same recipe: the same weights as the model inference serves.
    assert base_fingerprint(done.spec.base_model) == base_fingerprint(str(tiny_model_dir))


def test_a_default_base_that_is_not_here_is_refused_naming_the_setting(tmp_path):
    missing = Stack(tmp_path / "missing", default_base_model=str(tmp_path / "no-such-model"))
    try:
        path = tmp_path / "pirate.jsonl"
        path.write_bytes(memorization_jsonl())
        uploaded = missing.client.upload_dataset(path)
        spec = _spec("", uploaded.id, "svc-missing-base", METHODS["lora"])
        with pytest.raises(grpc.RpcError) as refused:
            missing.client.submit(spec)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "this trainer's default base: set --default-base-model" in refused.value.details()
        assert list(missing.client.list()) == []  # nothing stored
    finally:
        missing.stop()


def test_a_dataset_is_deleted_with_its_bytes_unless_an_unfinished_job_uses_it(stack, tmp_path):
    from services.trainer.core import state_event
    from services.trainer.domain import JobSpec

    path = tmp_path / "spare.jsonl"
    path.write_bytes(memorization_jsonl(3))
    spare = stack.client.upload_dataset(path)
    core = stack.core
    core.store.add_job("job-holds-spare", JobSpec(train_dataset_ids=(spare.id,)), state_event("validating"))
    core.store.update("job-holds-spare", state="validating")  # unfinished, never scheduled
    with pytest.raises(grpc.RpcError) as info:
        stack.client.delete_dataset(spare.id)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "job-holds-spare" in info.value.details()
    core.store.update("job-holds-spare", state="cancelled")
    assert core.datasets.exists(spare.sha256)
    assert stack.client.delete_dataset(spare.id).num_records == 3
    assert not core.datasets.exists(spare.sha256)
    with pytest.raises(grpc.RpcError) as info:
        stack.client.get_dataset(spare.id)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
