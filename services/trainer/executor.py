"""Executors run a job's worker. The local one: one subprocess per attempt, in its own process group.

The interface is small so a Kubernetes executor (a batch/v1 Job per attempt) can stand
beside it: start an attempt, cancel it, and report its exit through `on_exit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

OnExit = Callable[[str, int, int, str], Awaitable[None]]  # job_id, attempt, exit code, log tail


class Executor(Protocol):
    async def start(self, job_id: str, attempt: int) -> None: ...

    async def cancel(self, job_id: str) -> None: ...

    async def close(self) -> None: ...


class LocalExecutor:
    """`python -m services.trainer.worker` per attempt; cancel kills the whole process group."""

    def __init__(
        self, trainer_address: Callable[[], str], log_dir: Path, on_exit: OnExit, kill_grace_s: float = 3.0
    ) -> None:
        self.trainer_address = trainer_address
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.on_exit = on_exit
        self.kill_grace_s = kill_grace_s
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self._monitors: set[asyncio.Task] = set()

    def log_path(self, job_id: str) -> Path:
        return self.log_dir / f"{job_id}.log"

    async def start(self, job_id: str, attempt: int) -> None:
        log_file = self.log_path(job_id).open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.trainer.worker",
            "--job-id",
            job_id,
            "--attempt",
            str(attempt),
            "--trainer",
            self.trainer_address(),
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            env=env,
        )
        log_file.close()
        self.processes[job_id] = proc
        log.info("started worker for %s (attempt %d, pid %d)", job_id, attempt, proc.pid)
        task = asyncio.create_task(self._monitor(job_id, attempt, proc))
        self._monitors.add(task)
        task.add_done_callback(self._monitors.discard)

    async def _monitor(self, job_id: str, attempt: int, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self.processes.get(job_id) is proc:
            del self.processes[job_id]
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join(self.log_path(job_id).read_text(errors="replace").splitlines()[-15:])
        await self.on_exit(job_id, attempt, code, tail)

    async def cancel(self, job_id: str) -> None:
        proc = self.processes.get(job_id)
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.kill_grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    async def close(self) -> None:
        """On trainer shutdown, workers are stopped; their jobs resume when the trainer comes back."""
        for task in list(self._monitors):
            task.cancel()  # their exits are not failures of the job
        for job_id in list(self.processes):
            await self.cancel(job_id)
