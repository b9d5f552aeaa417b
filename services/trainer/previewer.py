"""The trainer server's side of dataset previews: a helper process that holds the tokenizers.

Previews need a tokenizer, and loading one imports transformers and torch (~7 s and a few hundred
MB), which the trainer server never does. So the first preview starts `services.trainer.worker.preview`
as a child process, which keeps the tokenizers it loaded; later previews cost their tokenization only.
The child exits after `idle_s` without a request (its memory comes back), and one that died or hung
is replaced on the next preview. One request at a time: previews are interactive and rare.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO

from tunedock.errors import FailedPrecondition, InvalidArgument, Unavailable

START_TIMEOUT_S = 180.0
"""The first answer includes importing transformers and loading the tokenizer."""


class Previewer:
    def __init__(self, idle_s: float = 300.0, timeout_s: float = 120.0) -> None:
        self.idle_s, self.timeout_s = idle_s, timeout_s
        self._lock = threading.Lock()
        self._child: subprocess.Popen | None = None
        self._stderr: IO[bytes] | None = None
        self._last = 0.0
        self._idle_timer: threading.Timer | None = None

    def preview(self, request: dict) -> dict:
        line = json.dumps(request) + "\n"
        with self._lock:
            fresh = self._child is None or self._child.poll() is not None
            if fresh:
                self._start()
            answer = self._ask(line, START_TIMEOUT_S if fresh else self.timeout_s)
            self._last = time.monotonic()
            self._arm_idle()
        if "error" in answer:
            kind, _, message = answer["error"].partition(": ")
            raise (InvalidArgument if kind in ("InvalidArgument", "FormattingError") else FailedPrecondition)(
                f"dataset preview: {message}"
            )
        return answer

    def _start(self) -> None:
        self._stop()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the child; closed in _stop)
        self._child = subprocess.Popen(
            [sys.executable, "-m", "services.trainer.worker.preview"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )

    def _ask(self, line: str, timeout_s: float) -> dict:
        child = self._child
        assert child is not None and child.stdin is not None and child.stdout is not None
        try:
            child.stdin.write(line)
            child.stdin.flush()
            ready, _, _ = select.select([child.stdout], [], [], timeout_s)
            answer = child.stdout.readline() if ready else ""
        except (BrokenPipeError, OSError):
            answer = ""
        if not answer:
            why = f"gave no answer in {timeout_s:.0f} s" if child.poll() is None else f"exited ({child.returncode})"
            tail = self._stderr_tail()
            self._stop()
            raise Unavailable(f"the dataset preview helper {why}: try again{f'; it said: {tail}' if tail else ''}")
        return json.loads(answer)

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1][-300:] if lines else ""

    def _arm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = threading.Timer(self.idle_s, self._close_if_idle)
        self._idle_timer.daemon = True
        self._idle_timer.start()

    def _close_if_idle(self) -> None:
        with self._lock:
            if time.monotonic() - self._last >= self.idle_s - 0.5:
                self._stop()

    def _stop(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            try:
                child.stdin.close()  # type: ignore[union-attr]
                child.wait(timeout=5)
            except Exception:
                child.kill()
                child.wait()
            child.stdout.close()  # type: ignore[union-attr]
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.poll() is None

    def close(self) -> None:
        with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._stop()
