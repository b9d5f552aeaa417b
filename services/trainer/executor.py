"""Executors run a job's worker. The local one: one subprocess per attempt, in its own process group.

The interface is small so the Kubernetes executor (`services.trainer.kube`, a batch/v1 Job
per attempt) stands beside it: start an attempt, cancel it, and report its exit through
`on_exit`. Both run the same command (`worker_command`): the worker module, under
torchrun when the job asks for several processes.

On a GPU node the local executor hands out GPUs from a pool: each attempt gets its own
devices (CUDA_VISIBLE_DEVICES), and a job that needs more than are free waits in the queue.
Each worker's process group id is kept in a file beside its log, so a trainer that restarts
after a crash stops the workers its previous run left behind before starting new attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

OnExit = Callable[[str, int, int, str], Awaitable[None]]  # job_id, attempt, exit code, log tail


@dataclass(frozen=True)
class Launch:
    """What an executor needs to know about a job to start its worker."""

    method: str = "lora"
    processes_per_node: int = 1
    nodes: int = 1
    token: str = ""
    """The attempt's job-scoped worker token (empty with authentication off); given to the worker as TUNEDOCK_TOKEN."""


ONE_PROCESS = Launch()
RENDEZVOUS_PORT = 29500
EXIT_PLATFORM = 75
"""Worker exit code (EX_TEMPFAIL) for "TuneDock's services failed me", which costs the job no attempt."""


def worker_command(
    job_id: str, attempt: int, trainer: str, launch: Launch, python: str = sys.executable, rendezvous: str = ""
) -> list[str]:
    """The worker's command line; torchrun in front of it for several processes or nodes.

    `rendezvous` (host:port of node 0) is needed with several nodes; torchrun's node rank
    comes from the environment there (Kubernetes indexed Jobs set JOB_COMPLETION_INDEX).
    """
    worker = ["-m", "services.trainer.worker", "--job-id", job_id, "--attempt", str(attempt), "--trainer", trainer]
    if launch.processes_per_node == 1 and launch.nodes == 1:
        return [python, *worker]
    torchrun = [python, "-m", "torch.distributed.run", f"--nproc-per-node={launch.processes_per_node}"]
    if launch.nodes == 1:
        torchrun.append("--standalone")
    else:
        torchrun += [
            f"--nnodes={launch.nodes}",
            "--node-rank=$(JOB_COMPLETION_INDEX)",
            "--rdzv-backend=static",
            f"--master-addr={rendezvous.rsplit(':', 1)[0]}",
            f"--master-port={rendezvous.rsplit(':', 1)[1] if ':' in rendezvous else RENDEZVOUS_PORT}",
        ]
    return [*torchrun, "--max-restarts=0", *worker]


def detect_gpus() -> list[str]:
    """GPUs this node offers: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists (no torch here)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


class GpuPool:
    """GPU ids handed out to attempts, each id to one attempt at a time."""

    def __init__(self, gpus: list[str], per_process: int = 1) -> None:
        self.free = list(gpus)
        self.total = len(gpus)
        self.per_process = per_process
        self.held: dict[str, list[str]] = {}

    def needed(self, launch: Launch) -> int:
        return launch.processes_per_node * self.per_process if self.total else 0

    def can_take(self, launch: Launch) -> bool:
        return self.needed(launch) <= len(self.free)

    def take(self, job_id: str, launch: Launch) -> list[str]:
        n = self.needed(launch)
        if n > self.total:
            raise ValueError(f"the job needs {n} GPUs; this node has {self.total}")
        taken, self.free = self.free[:n], self.free[n:]
        self.held[job_id] = taken
        return taken

    def give_back(self, job_id: str) -> None:
        self.free.extend(self.held.pop(job_id, []))


class Executor(Protocol):
    kind: str
    """Where workers run: local or kubernetes."""
    multi_node: bool
    """Whether the executor can spread one job over several nodes."""
    device: str
    """What workers train on: cuda or cpu."""

    def can_start(self, launch: Launch) -> bool:
        """Whether an attempt with this launch could start now (resources free)."""
        ...

    async def start(self, job_id: str, attempt: int, launch: Launch) -> None: ...

    async def cancel(self, job_id: str) -> None: ...

    async def close(self) -> None: ...


class LocalExecutor:
    """`python -m services.trainer.worker` per attempt (under torchrun for several processes);
    cancel kills the whole process group."""

    kind = "local"
    multi_node = False

    def __init__(
        self,
        trainer_address: Callable[[], str],
        log_dir: Path,
        on_exit: OnExit,
        kill_grace_s: float = 3.0,
        gpus: list[str] | None = None,
        gpus_per_process: int = 1,
    ) -> None:
        self.trainer_address = trainer_address
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.on_exit = on_exit
        self.kill_grace_s = kill_grace_s
        self.gpus = GpuPool(detect_gpus() if gpus is None else gpus, gpus_per_process)
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self._monitors: set[asyncio.Task] = set()
        self.on_monitor_error: Callable[[], None] = lambda: None
        """Counts a monitor that raised (the server wires it to tunedock_background_errors_total)."""

    @property
    def device(self) -> str:
        return "cuda" if self.gpus.total else "cpu"

    def log_path(self, job_id: str) -> Path:
        return self.log_dir / f"{job_id}.log"

    def _pid_path(self, job_id: str) -> Path:
        return self.log_dir / f"{job_id}.pgid"

    def can_start(self, launch: Launch) -> bool:
        return self.gpus.can_take(launch)

    async def start(self, job_id: str, attempt: int, launch: Launch = ONE_PROCESS) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        if launch.token:
            env["TUNEDOCK_TOKEN"] = launch.token
        if self.gpus.total:
            devices = self.gpus.take(job_id, launch)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
            log.info("job %s gets GPU(s) %s", job_id, ",".join(devices))
        elif "CUDA_VISIBLE_DEVICES" not in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = ""  # a node without a pool: workers must not wander onto a GPU
        log_file = self.log_path(job_id).open("ab")
        if launch.processes_per_node > 1:
            # Each rank gets its share of the cores instead of all ranks fighting over all of them.
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // launch.processes_per_node))
        proc = await asyncio.create_subprocess_exec(
            *worker_command(job_id, attempt, self.trainer_address(), launch),
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            env=env,
        )
        log_file.close()
        self.processes[job_id] = proc
        self._pid_path(job_id).write_text(str(proc.pid))  # the process group id (start_new_session)
        log.info("started worker for %s (attempt %d, pid %d)", job_id, attempt, proc.pid)
        task = asyncio.create_task(self._monitor(job_id, attempt, proc))
        self._monitors.add(task)
        task.add_done_callback(self._monitor_done)

    def _monitor_done(self, task: asyncio.Task) -> None:
        """A monitor that raised is logged with its traceback, never left as "exception never retrieved"."""
        self._monitors.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("the monitor of a worker failed", exc_info=task.exception())
            self.on_monitor_error()

    async def _monitor(self, job_id: str, attempt: int, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self.processes.get(job_id) is proc:
            del self.processes[job_id]
            self.gpus.give_back(job_id)
            self._pid_path(job_id).unlink(missing_ok=True)
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

    async def reap(self) -> list[int]:
        """Stop workers a previous trainer process left running (after a crash); returns their pgids."""
        reaped = []
        for pid_file in self.log_dir.glob("*.pgid"):
            job_id = pid_file.stem
            if job_id in self.processes:
                continue
            with contextlib.suppress(ValueError, OSError):
                pgid = int(pid_file.read_text())
                if _is_worker(pgid):
                    os.killpg(pgid, signal.SIGKILL)
                    reaped.append(pgid)
                    log.warning("stopped worker process group %d of %s left by a previous trainer", pgid, job_id)
            pid_file.unlink(missing_ok=True)
        return reaped

    async def close(self) -> None:
        """On trainer shutdown, workers are stopped; their jobs resume when the trainer comes back."""
        for task in list(self._monitors):
            task.cancel()  # their exits are not failures of the job
        for job_id in list(self.processes):
            await self.cancel(job_id)


def _is_worker(pid: int) -> bool:
    """The process still exists and is a TuneDock worker (not a pid the OS reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"services.trainer.worker" in cmdline or b"torch.distributed.run" in cmdline
