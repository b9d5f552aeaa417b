"""Start the three services locally on the embedded defaults (what `tunedock up` runs).

Each service is its own process (`python -m services.X`), sharing one data directory;
they stop together on Ctrl-C/SIGTERM. Kept free of heavy imports: only the tiny model
build (when no base model is given) pulls in torch, once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunedock.healthcheck import check_health

SERVICES = (
    # (module, proto service, default port, default metrics port)
    ("trainer", "tunedock.v1.TrainerService", 50051, 9451),
    ("adapter_registry", "tunedock.v1.AdapterRegistryService", 50052, 9452),
    ("inference", "tunedock.v1.InferenceService", 50053, 9453),
)
WORKER_PORT = 50054
"""The trainer's worker API (TrainerWorkerService)."""
OPENAI_PORT = 8000
"""Inference's OpenAI-compatible HTTP API (the port `vllm serve` uses, so tools' defaults fit); it forwards
/v1/files and /v1/fine_tuning to the trainer's, so clients are given one base URL."""
FINE_TUNING_PORT = 8001
"""The trainer's OpenAI-compatible fine-tuning API (/v1/files, /v1/fine_tuning/jobs)."""


@dataclass(frozen=True)
class LocalCredentials:
    """Authentication of a local stack: one admin token for the user, service tokens, the worker key."""

    token_file: Path
    admin_token_file: Path
    worker_key_file: Path
    trainer_token_file: Path
    inference_token_file: Path

    @property
    def admin_token(self) -> str:
        return self.admin_token_file.read_text().strip()


def local_credentials(data_dir: Path) -> LocalCredentials:
    """Create (once) the token file of a local stack; the CLI finds the admin token in `<data_dir>/token`."""
    from tunedock.tokenfile import add_token, load_key

    auth = data_dir / "auth"
    creds = LocalCredentials(
        token_file=auth / "tokens.json",
        admin_token_file=data_dir / "token",
        worker_key_file=auth / "worker.key",
        trainer_token_file=auth / "trainer.token",
        inference_token_file=auth / "inference.token",
    )
    needed = (creds.token_file, creds.admin_token_file, creds.trainer_token_file, creds.inference_token_file)
    if all(p.exists() for p in needed):
        return creds
    auth.mkdir(parents=True, exist_ok=True)
    creds.token_file.unlink(missing_ok=True)
    for path, name, roles, kind in (
        (creds.admin_token_file, "local-admin", ["all"], "user"),
        (creds.trainer_token_file, "trainer-service", ["registry.read"], "service"),
        (creds.inference_token_file, "inference-service", ["registry.read"], "service"),
    ):
        token = add_token(creds.token_file, name, roles, ["*"], kind)
        path.write_text(token + "\n")
        path.chmod(0o600)
    load_key(creds.worker_key_file)
    return creds


@dataclass
class LocalStack:
    """The three services as child processes, with authentication on (one generated admin token)."""

    data_dir: Path
    host: str = "127.0.0.1"
    base_model: str = ""
    port_offset: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def address(self, module: str) -> str:
        port = next(p for m, _, p, _ in SERVICES if m == module) + self.port_offset
        return f"{self.host}:{port}"

    @property
    def openai_base_url(self) -> str:
        return f"http://{self.host}:{OPENAI_PORT + self.port_offset}/v1"

    def ports(self) -> list[int]:
        """Every port the stack binds: gRPC and metrics of each service, the worker API, the OpenAI API."""
        listed = [port for _, _, grpc_port, metrics in SERVICES for port in (grpc_port, metrics)]
        return [port + self.port_offset for port in (*listed, WORKER_PORT, OPENAI_PORT, FINE_TUNING_PORT)]

    def check_ports_free(self) -> None:
        """Refuse to start over ports in use: a stack left running would answer the health checks in
        place of ours (whose servers then exit, unable to bind) and every command would reach it."""
        busy = []
        for port in self.ports():
            with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as probe:
                try:
                    probe.bind((self.host, port))
                except OSError:
                    busy.append(port)
        if busy:
            raise RuntimeError(
                f"port(s) {', '.join(map(str, busy))} on {self.host} are in use, by another TuneDock stack or another "
                "program: stop it (a stack started with `tunedock up` stops on Ctrl-C), or start this one elsewhere "
                "with --port-offset"
            )

    def start(self) -> None:
        self.check_ports_free()
        self.credentials = local_credentials(self.data_dir)
        creds = self.credentials
        env = {**os.environ, "TUNEDOCK_HOME": str(self.data_dir), **self.extra_env}
        env.setdefault("PYTHONUNBUFFERED", "1")
        log_dir = self.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        for module, _, port, metrics_port in SERVICES:
            args = [
                sys.executable,
                "-m",
                f"services.{module}",
                "--host",
                self.host,
                "--port",
                str(port + self.port_offset),
                "--metrics-port",
                str(metrics_port + self.port_offset),
                "--data-dir",
                str(self.data_dir),
                "--token-file",
                str(creds.token_file),
            ]
            if module != "adapter_registry":
                args += ["--registry-address", self.address("adapter_registry")]
            if module != "inference":
                args += ["--worker-key-file", str(creds.worker_key_file)]
            if module == "trainer":
                args += ["--worker-port", str(WORKER_PORT + self.port_offset)]
                args += ["--registry-token-file", str(creds.trainer_token_file)]
                args += ["--http-port", str(FINE_TUNING_PORT + self.port_offset)]
            if module == "inference":
                args += ["--registry-token-file", str(creds.inference_token_file)]
                args += ["--http-port", str(OPENAI_PORT + self.port_offset)]
                args += ["--fine-tuning-url", f"http://{self.host}:{FINE_TUNING_PORT + self.port_offset}"]
            if module == "inference" and self.base_model:
                args += ["--base-model", self.base_model]
            if module == "trainer" and self.base_model:  # jobs without a base train on the one served
                args += ["--default-base-model", self.base_model]
            log_file = open(log_dir / f"{module}.log", "ab")  # noqa: SIM115 - owned by the child
            self.processes[module] = subprocess.Popen(
                args, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_healthy(self, timeout: float = 120.0) -> dict[str, str]:
        """Wait until every service answers SERVING; raise with the log tail if one dies or times out."""
        deadline = time.monotonic() + timeout
        status: dict[str, str] = {}
        while time.monotonic() < deadline:
            for module, service, _, _ in SERVICES:
                proc = self.processes[module]
                if proc.poll() is not None:
                    raise RuntimeError(f"{module} exited with code {proc.returncode}:\n{self.log_tail(module)}")
                status[module] = check_health(self.address(module), service, timeout=1.0)
            if all(s == "SERVING" for s in status.values()):
                return status
            time.sleep(0.3)
        waiting = ", ".join(m for m, s in status.items() if s != "SERVING")
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {waiting} to become healthy")

    def log_tail(self, module: str, lines: int = 20) -> str:
        path = self.data_dir / "logs" / f"{module}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, timeout: float = 20.0) -> dict[str, int]:
        """SIGTERM all, wait, SIGKILL stragglers; returns exit codes."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes = {}
        for module, proc in self.processes.items():
            try:
                codes[module] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes[module] = proc.wait()
        return codes
