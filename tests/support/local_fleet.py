"""Several inference replicas behind HAProxy on this machine, routed by adapter (deploy/haproxy/haproxy.cfg).

What the Kubernetes `gpu` overlay runs, on one host: N `services.inference` processes, a DNS
server (dnsmasq) publishing them as SRV records the way a headless Service does, and HAProxy
with the repository's own config. The tests and bench/routing.py use it; `proxy_address` is
where clients connect. Needs Debian's `haproxy` and `dnsmasq-base` (`.ci/run` installs them).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tunedock.healthcheck import check_health

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
SRV_NAME = "_grpc._tcp.inference.tunedock.test"
HTTP_SRV_NAME = "_http._tcp.inference.tunedock.test"  # the replicas' OpenAI-compatible API
BACKENDS = ("by_adapter", "base_model", "openai_by_adapter", "openai_base")


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free now, below the kernel's ephemeral range.

    The processes bind it seconds later (and a restarted replica binds it again): a port from the
    ephemeral range could meanwhile be taken by any outgoing connection on the machine, which is
    how a CI run once failed to start a replica. Below the range only explicit binds take ports.
    """
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(max(1024, low - 12000), low - 1)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def need(binary: str, package: str) -> str:
    path = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
    if path is None:
        raise RuntimeError(f"{binary} is not installed: apt-get install {package}")
    return path


@dataclass
class Replica:
    index: int
    port: int
    metrics_port: int
    http_port: int
    data_dir: Path
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"


@dataclass
class LocalFleet:
    """`replicas` inference processes serving `base_model` from `registry_address`, behind one HAProxy."""

    home: Path
    base_model: str
    registry_address: str
    replicas: int = 2
    replica_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    members: list[Replica] = field(default_factory=list)
    _dns: subprocess.Popen | None = None
    _proxy: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.proxy_port, self.admin_port, self.dns_port = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
        self.members = [
            Replica(i, free_port(), free_port(), free_port(), self.home / f"replica-{i}")
            for i in range(1, self.replicas + 1)
        ]
        self.proxy_http_port = free_port()

    @property
    def proxy_address(self) -> str:
        return f"127.0.0.1:{self.proxy_port}"

    @property
    def openai_base_url(self) -> str:
        """The proxy's OpenAI-compatible API, as clients configure it."""
        return f"http://127.0.0.1:{self.proxy_http_port}/v1"

    @property
    def base_model_id(self) -> str:
        """The base's id in the OpenAI API (the replicas' default served model name)."""
        return Path(self.base_model).name if Path(self.base_model).exists() else self.base_model

    # ------------------------------------------------------------------------------ processes

    def start(self) -> None:
        for replica in self.members:
            self.start_replica(replica.index)
        self._start_dns()
        self._start_proxy()

    def start_replica(self, index: int) -> None:
        replica = self.members[index - 1]
        replica.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable,
            "-m",
            "services.inference",
            "--port",
            str(replica.port),
            "--metrics-port",
            str(replica.metrics_port),
            "--http-port",
            str(replica.http_port),
            "--data-dir",
            str(replica.data_dir),
            "--base-model",
            self.base_model,
            "--registry-address",
            self.registry_address,
            "--metrics-adapter-labels",
            "names",  # the tests read which replica served which adapter
            "--peers-srv",
            HTTP_SRV_NAME,  # the Serving page's view of every replica, found as the proxy finds them
            "--peers-nameserver",
            f"127.0.0.1:{self.dns_port}",
            *self.replica_args,
        ]
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {"PYTHONUNBUFFERED": "1"} | self.env
        log = (self.home / f"replica-{index}.log").open("ab")
        replica.process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill_replica(self, index: int) -> None:
        """SIGKILL, as a crash or a lost node: no graceful drain."""
        replica = self.members[index - 1]
        if replica.process is not None and replica.process.poll() is None:
            os.killpg(replica.process.pid, signal.SIGKILL)
            replica.process.wait()

    def _start_dns(self) -> None:
        records = []
        for replica in self.members:
            host = f"replica-{replica.index}.inference.tunedock.test"
            records += [
                f"--host-record={host},127.0.0.1",
                f"--srv-host={SRV_NAME},{host},{replica.port},0,100",
                f"--srv-host={HTTP_SRV_NAME},{host},{replica.http_port},0,100",
            ]
        self._dns = subprocess.Popen(
            [
                need("dnsmasq", "dnsmasq-base"),
                "--keep-in-foreground",
                f"--port={self.dns_port}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
                "--pid-file=",
                *records,
            ],
            stdout=(self.home / "dns.log").open("ab"),
            stderr=subprocess.STDOUT,
        )

    def _start_proxy(self) -> None:
        env = {
            **os.environ,
            "TUNEDOCK_PROXY_BIND": self.proxy_address,
            "TUNEDOCK_PROXY_ADMIN": f"127.0.0.1:{self.admin_port}",
            "TUNEDOCK_INFERENCE_SRV": SRV_NAME,
            "TUNEDOCK_DNS_SERVER": f"127.0.0.1:{self.dns_port}",
            "TUNEDOCK_PROXY_HTTP_BIND": f"127.0.0.1:{self.proxy_http_port}",
            "TUNEDOCK_INFERENCE_HTTP_SRV": HTTP_SRV_NAME,
            "TUNEDOCK_BASE_MODEL_ID": self.base_model_id,
        }
        self._proxy = subprocess.Popen(
            [need("haproxy", "haproxy"), "-W", "-db", "-f", str(CONFIG)],
            env=env,
            stdout=(self.home / "haproxy.log").open("ab"),
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        for replica in self.members:
            if replica.process is not None and replica.process.poll() is None:
                replica.process.send_signal(signal.SIGTERM)
        for proc in (self._proxy, self._dns):
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for replica in self.members:
            if replica.process is not None:
                try:
                    replica.process.wait(30)
                except subprocess.TimeoutExpired:
                    self.kill_replica(replica.index)
        for proc in (self._proxy, self._dns):
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)

    # ------------------------------------------------------------------------------- state

    def proxy_servers(self) -> dict[tuple[str, str], dict]:
        """HAProxy's view: {(backend, server): stats row} of the replicas that DNS filled in."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats;csv", timeout=5) as reply:
            text = reply.read().decode().lstrip("# ")
        rows = {}
        for row in csv.DictReader(io.StringIO(text)):
            if row["svname"] not in ("FRONTEND", "BACKEND") and row.get("addr"):
                rows[(row["pxname"], row["svname"])] = row
        return rows

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Until every replica is SERVING and HAProxy has them UP in every backend (gRPC and HTTP)."""
        deadline = time.monotonic() + timeout
        wanted = self.members
        while time.monotonic() < deadline:
            for name, proc in (("haproxy", self._proxy), ("dns", self._dns)):
                if proc is not None and proc.poll() is not None:
                    log = (self.home / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{name} exited {proc.returncode}:\n{log}")
            for replica in wanted:
                if replica.process is not None and replica.process.poll() is not None:
                    log = (self.home / f"replica-{replica.index}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"replica {replica.index} exited {replica.process.returncode}:\n{log}")
            healthy = all(
                check_health(r.address, "tunedock.v1.InferenceService", timeout=1.0) == "SERVING" for r in wanted
            )
            if healthy:
                with contextlib.suppress(OSError):
                    servers = self.proxy_servers()
                    up = {(b, row["addr"]) for (b, _), row in servers.items() if row["status"] == "UP"}
                    addresses = {"openai_by_adapter": "http_address", "openai_base": "http_address"}
                    if all((b, getattr(r, addresses.get(b, "address"))) in up for r in wanted for b in BACKENDS):
                        return
            time.sleep(0.5)
        raise RuntimeError(f"the fleet was not ready after {timeout:.0f}s; logs in {self.home}")

    def samples(self, index: int) -> list:
        """A replica's Prometheus samples (prometheus_client's parser)."""
        from prometheus_client.parser import text_string_to_metric_families

        replica = self.members[index - 1]
        with urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        return [sample for family in text_string_to_metric_families(text) for sample in family.samples]

    def value(self, index: int, name: str, **labels: str) -> float:
        """The sum of a replica's samples called `name` whose labels include `labels` (0 when there are none)."""
        return sum(s.value for s in self.samples(index) if s.name == name and labels.items() <= s.labels.items())

    def adapter_requests(self, index: int) -> dict[str, float]:
        """{adapter name: requests this replica served for it}."""
        counts = [s for s in self.samples(index) if s.name == "tunedock_adapter_requests_total"]
        return {s.labels["adapter"]: s.value for s in counts}
