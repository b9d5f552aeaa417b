"""Helpers shared by the benchmarks: start a service as a subprocess, print tables, write JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def start_service(module: str, data_dir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`python -m services.<module>` on a free port; returns (process, address). Logs go to <data_dir>.log."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.with_suffix(".log")
    log = log_path.open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            f"services.{module}",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--data-dir",
            str(data_dir),
            *args,
        ],
        cwd=ROOT,
        stderr=log,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "grpc_port" in record:
                return proc, f"127.0.0.1:{record['grpc_port']}"
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{module} did not start:\n{log_path.read_text()[-3000:]}")


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) + " |")


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path.relative_to(ROOT)}")
    return path
