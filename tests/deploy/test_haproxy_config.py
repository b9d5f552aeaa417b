"""deploy/haproxy/haproxy.cfg: valid for HAProxy in both modes, and its raw gRPC health check is the real one.

HAProxy's http-check cannot send NUL bytes, so the config speaks the gRPC health check as raw
HTTP/2 bytes. Here they are decoded with an independent HPACK decoder and sent to a real gRPC
server: SERVING passes the config's `expect`, NOT_SERVING does not.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.certs import make_pki

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (.ci/run installs it)")


def _sent_and_expected() -> tuple[bytes, bytes]:
    text = CONFIG.read_text()
    # The plaintext branch's check: every send-binary line, in order, and the expect.
    sent = b"".join(bytes.fromhex(h) for h in re.findall(r"^\s*tcp-check send-binary ([0-9a-f]+)$", text, re.M))
    (expected,) = re.findall(r"^\s*tcp-check expect binary ([0-9a-f]+)$", text, re.M)
    return sent, bytes.fromhex(expected)


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    frames = []
    while data:
        length = int.from_bytes(data[:3], "big")
        frames.append((data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF, data[9 : 9 + length]))
        data = data[9 + length :]
    return frames


def test_the_health_check_bytes_are_a_grpc_health_check_for_the_inference_service():
    from hpack import Decoder

    sent, expected = _sent_and_expected()
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert sent.startswith(preface)
    frames = _frames(sent[len(preface) :])
    assert [(t, flags, stream) for t, flags, stream, _ in frames] == [(4, 0, 0), (1, 4, 1), (0, 1, 1)]
    headers = dict(Decoder().decode(frames[1][3]))
    assert headers == {
        ":method": "POST",
        ":scheme": "http",
        ":path": "/grpc.health.v1.Health/Check",
        ":authority": "localhost",
        "content-type": "application/grpc",
        "te": "trailers",
    }
    body = frames[2][3]
    assert body[0] == 0 and int.from_bytes(body[1:5], "big") == len(body) - 5
    request = health_pb2.HealthCheckRequest.FromString(body[5:])
    assert request.service == "tunedock.v1.InferenceService"
    reply = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).SerializeToString()
    assert expected == b"\x00" + len(reply).to_bytes(4, "big") + reply


@pytest.mark.parametrize("status, passes", [("SERVING", True), ("NOT_SERVING", False)])
def test_a_real_grpc_server_answers_the_check_as_haproxy_expects(status, passes):
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    servicer.set("tunedock.v1.InferenceService", health_pb2.HealthCheckResponse.ServingStatus.Value(status))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    sent, expected = _sent_and_expected()
    received = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(sent)
            deadline = time.monotonic() + 3
            conn.settimeout(0.5)
            while expected not in received and time.monotonic() < deadline:
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                received += chunk
    finally:
        server.stop(0)
    assert (expected in received) is passes, received.hex()


@needs_haproxy
@pytest.mark.parametrize("openai", [False, True], ids=["grpc", "grpc+openai"])
@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_haproxy_accepts_the_config(tls, openai, tmp_path):
    env = {
        **os.environ,
        "TUNEDOCK_PROXY_BIND": "*:50053",
        "TUNEDOCK_PROXY_ADMIN": "*:8404",
        "TUNEDOCK_INFERENCE_SRV": "_grpc._tcp.tunedock-inference.tunedock.svc.cluster.local",
        "TUNEDOCK_DNS_SERVER": "127.0.0.1:53",
    }
    if openai:
        env |= {
            "TUNEDOCK_PROXY_HTTP_BIND": "*:8000",
            "TUNEDOCK_INFERENCE_HTTP_SRV": "_http._tcp.tunedock-inference.tunedock.svc.cluster.local",
            "TUNEDOCK_BASE_MODEL_ID": "meta-llama/Llama-3.1-8B-Instruct",
            "TUNEDOCK_TRAINER_HTTP_SRV": "_http._tcp.tunedock-trainer.tunedock.svc.cluster.local",
        }
    if tls:
        pki = make_pki(tmp_path / "pki")
        tls_dir = tmp_path / "tls"
        tls_dir.mkdir()
        shutil.copy(pki.server_cert, tls_dir / "tls.pem")
        shutil.copy(pki.server_key, tls_dir / "tls.pem.key")
        shutil.copy(pki.ca, tls_dir / "ca.crt")
        env["TUNEDOCK_PROXY_TLS_DIR"] = str(tls_dir)
    result = subprocess.run([HAPROXY, "-c", "-f", str(CONFIG)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr
    assert "warning" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr
