"""The shared server runtime through real servers: health, reflection, metrics, error mapping, shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.server import GrpcServer, ServiceBinding
from services.common.server_thread import ServerThread
from services.common.settings import ServerSettings
from tunedock import errors
from tunedock.v1 import inference_pb2, inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
SERVICES = [
    ("services.trainer", "tunedock.v1.TrainerService"),
    ("services.adapter_registry", "tunedock.v1.AdapterRegistryService"),
    pytest.param("services.inference", "tunedock.v1.InferenceService", marks=[pytest.mark.vllm, pytest.mark.slow]),
]


class FailingServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Raises the exception the prompt names, so each mapping can be checked end to end."""

    RAISES = {
        "not_found": errors.NotFound("adapter 'x' not found; list adapters with `tunedock adapters ls`"),
        "invalid": errors.InvalidArgument("max_tokens must be > 0"),
        "precondition": errors.FailedPrecondition("adapter rank 64 exceeds max_lora_rank 16"),
        "unavailable": errors.Unavailable("registry at 127.0.0.1:1 is unreachable"),
        "exhausted": errors.ResourceExhausted("prompt is 9000 tokens; the limit is 1024"),
        "bug": RuntimeError("secret internal detail /etc/passwd"),
    }

    async def GenerateUnary(self, request, context):
        raise self.RAISES[request.params.prompt]

    async def Generate(self, request, context):
        yield inference_pb2.GenerateResponse(text_delta="first")
        raise self.RAISES[request.params.prompt]


@pytest.fixture
def failing_server(tmp_path):
    settings = ServerSettings(port=0, metrics_port=0, data_dir=tmp_path)

    async def build():
        return GrpcServer(
            settings,
            [
                ServiceBinding(
                    "tunedock.v1.InferenceService",
                    FailingServicer(),
                    inference_pb2_grpc.add_InferenceServiceServicer_to_server,
                )
            ],
        )

    thread = ServerThread(build)
    yield thread
    thread.stop()


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("not_found", grpc.StatusCode.NOT_FOUND),
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT),
        ("precondition", grpc.StatusCode.FAILED_PRECONDITION),
        ("unavailable", grpc.StatusCode.UNAVAILABLE),
        ("exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_domain_errors_map_to_status_codes(failing_server, kind, code):
    with grpc.insecure_channel(failing_server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateUnaryRequest(params=inference_pb2.GenerateParams(prompt=kind))
        with pytest.raises(grpc.RpcError) as info:
            stub.GenerateUnary(request, timeout=10)
        assert info.value.code() == code
        assert info.value.details() == FailingServicer.RAISES[kind].message
        # Streaming RPCs map the same way, after the items already sent.
        stream = stub.Generate(inference_pb2.GenerateRequest(params=request.params), timeout=10)
        assert next(stream).text_delta == "first"
        with pytest.raises(grpc.RpcError) as info:
            next(stream)
        assert info.value.code() == code


def test_unknown_error_is_internal_without_details(failing_server, caplog):
    with grpc.insecure_channel(failing_server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GenerateUnary(
                inference_pb2.GenerateUnaryRequest(params=inference_pb2.GenerateParams(prompt="bug")),
                timeout=10,
                metadata=[("x-request-id", "req-123")],
            )
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in info.value.details() and "passwd" not in info.value.details()
    assert "req-123" in info.value.details()
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and "secret internal detail" in str(logged[0].exc_info[1])


def test_metrics_count_each_rpc_by_code(failing_server):
    with grpc.insecure_channel(failing_server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for kind in ("invalid", "invalid", "not_found"):
            with pytest.raises(grpc.RpcError):
                stub.GenerateUnary(inference_pb2.GenerateUnaryRequest(params=inference_pb2.GenerateParams(prompt=kind)))
    url = f"http://127.0.0.1:{failing_server.server.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    labels = 'method="GenerateUnary",service="tunedock.v1.InferenceService"'
    assert f'tunedock_rpc_requests_total{{code="INVALID_ARGUMENT",{labels}}} 2.0' in body
    assert f'tunedock_rpc_requests_total{{code="NOT_FOUND",{labels}}} 1.0' in body
    assert f"tunedock_rpc_latency_seconds_count{{{labels}}} 3.0" in body


def test_metrics_with_a_scraper_token_answer_only_its_bearer(tmp_path):
    (tmp_path / "scraper.token").write_text("s3cret-scraper\n")
    settings = ServerSettings(
        port=0, metrics_port=0, data_dir=tmp_path, metrics_token_file=str(tmp_path / "scraper.token")
    )

    async def build():
        return GrpcServer(settings, [])

    thread = ServerThread(build)
    try:
        url = f"http://127.0.0.1:{thread.server.metrics_port}/metrics"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-scraper"}):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5)
            assert refused.value.code == 401 and b"tunedock_rpc" not in refused.value.read()
        scraped = urllib.request.Request(url, headers={"Authorization": "Bearer s3cret-scraper"})
        assert b"# HELP tunedock_rpc_requests_total" in urllib.request.urlopen(scraped, timeout=5).read()
    finally:
        thread.stop()


def test_adapter_labels_are_hashed_unless_names_are_asked_for():
    from prometheus_client import CollectorRegistry

    from services.inference.server import InferenceMetrics

    hashed = InferenceMetrics.create(CollectorRegistry())
    label = hashed.adapter_label("acme-support-bot")
    assert label.startswith("h-") and "acme" not in label and label == hashed.adapter_label("acme-support-bot")
    assert label != hashed.adapter_label("globex-support-bot")
    assert InferenceMetrics.create(CollectorRegistry(), "names").adapter_label("acme-support-bot") == "acme-support-bot"
    assert InferenceMetrics.create(CollectorRegistry(), "off").adapter_label("acme-support-bot") == "any"


def test_a_thousand_adapters_keep_the_adapter_series_bounded():
    from prometheus_client import CollectorRegistry

    from services.inference.server import InferenceMetrics

    registry = CollectorRegistry()
    metrics = InferenceMetrics.create(registry, "hashed", adapter_series=32)
    for i in range(1000):
        metrics.adapter_requests.labels(metrics.adapter_label(f"tenant-{i}-bot")).inc()
    series = [s for m in registry.collect() if m.name == "tunedock_adapter_requests" for s in m.samples]
    counts = {s.labels["adapter"]: s.value for s in series if s.name == "tunedock_adapter_requests_total"}
    assert len(counts) == 33 and counts["other"] == 968 and sum(counts.values()) == 1000
    assert metrics.adapter_label("tenant-0-bot") != "other"  # the first ones keep their series


def _start(module: str, tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int, int]:
    """Start `python -m module` on free ports; return (process, grpc port, metrics port) from its log."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--port", "0", "--metrics-port", "0", "--data-dir", str(tmp_path), *args],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    deadline = time.monotonic() + 300  # the inference service loads a vLLM engine first
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # vLLM's own log lines are not JSON
        if "grpc_port" in record:
            return proc, record["grpc_port"], record["metrics_port"]
    proc.kill()
    raise AssertionError(f"{module} did not start: {proc.stderr.read()}")


@pytest.mark.parametrize(("module", "service"), SERVICES)
def test_service_entrypoint_health_reflection_metrics(module, service, tmp_path):
    proc, port, metrics_port = _start(
        module, tmp_path, *(["--worker-port", "0"] if module == "services.trainer" else [])
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as info:
                health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = list(
                reflect.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
                )
            )
            listed = {s.name for s in replies[0].list_services_response.service}
            assert service in listed and "grpc.health.v1.Health" in listed
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert "tunedock_rpc_requests" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_sigterm_during_a_stream_ends_cleanly(tmp_path):
    """A watcher sees NOT_SERVING, its stream ends, and the process exits 0 within the grace period."""
    proc, port, _ = _start("services.trainer", tmp_path, "--shutdown-grace-s", "1", "--worker-port", "0")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert next(stream).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            next(stream)
        assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert proc.wait(15) == 0
    assert time.monotonic() - started < 10
    assert '"msg": "stopped"' in proc.stderr.read()


def test_bad_flag_gives_one_clear_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "services.inference", "--max-loras", "0", "--data-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "inference: need 1 <= max_loras <= max_cpu_loras, got max_loras=0, max_cpu_loras=16"
    ]


def test_servers_and_cli_do_not_import_torch_at_start_up():
    code = (
        "import sys, services.trainer.server, services.adapter_registry.server, services.inference.server, "
        "tunedock.cli, tunedock.cli.local_stack; "
        "heavy = sorted(m for m in ('torch', 'vllm', 'bitsandbytes', 'transformers') if m in sys.modules); "
        "print(heavy); sys.exit(bool(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
