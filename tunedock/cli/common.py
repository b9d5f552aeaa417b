"""What every `tunedock` command shares: consoles, service addresses, errors as one line and an exit code.

Conventions: `--json` on every read command prints machine-readable output; errors are one
line on stderr, never a traceback. Exit codes: 0 ok, 1 the server refused or the job failed,
2 bad input (missing file, bad option), 3 a service is unreachable, 4 not found,
5 not authenticated.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import typer
from google.protobuf import json_format
from rich.console import Console
from rich.markup import escape

from tunedock.errors import DeadlineExceeded, NotFound, TuneDockError, Unauthenticated, Unavailable, Unreachable


def _console(stderr: bool = False) -> Console:
    """A terminal gets its own width; a pipe or file gets whole lines (rich would cut tables to 80 columns)."""
    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=100_000 if wide else None)


console = _console()
err = _console(stderr=True)

TRAINER = os.environ.get("TUNEDOCK_TRAINER_ADDRESS", "127.0.0.1:50051")
REGISTRY = os.environ.get("TUNEDOCK_REGISTRY_ADDRESS", "127.0.0.1:50052")
INFERENCE = os.environ.get("TUNEDOCK_INFERENCE_ADDRESS", "127.0.0.1:50053")
SPARK = "▁▂▃▄▅▆▇█"


def fail(message: str, code: int) -> None:
    """Print `message` as sent (escaped: server text like "[in=1024, out=512]" is not rich markup) and exit."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


UNREACHABLE_HINT = (
    "cannot reach the TuneDock service; is `tunedock up` running? (addresses: --trainer/--registry/--inference or "
    "TUNEDOCK_TRAINER_ADDRESS etc.)"
)
UNAUTHENTICATED_HINT = "; set TUNEDOCK_TOKEN (or TUNEDOCK_TOKEN_FILE) to a token from the admin"
EXIT_CODES: list[tuple[type[TuneDockError], int]] = [
    (Unavailable, 3),  # Unreachable too: nothing answered, or the service says what is down
    (DeadlineExceeded, 3),
    (NotFound, 4),
    (Unauthenticated, 5),
]
"""Exit code by error class (the first that matches); any other refusal by a server exits 1."""


def exit_code(exc: TuneDockError) -> int:
    if not callable(getattr(exc, "code", None)):
        return 2  # raised here, before any call: the input is wrong
    return next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), 1)


def cli_errors(fn):
    """One clear line and a meaningful exit code instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TuneDockError as exc:
            message = exc.message
            if isinstance(exc, Unreachable):
                message = UNREACHABLE_HINT
            elif isinstance(exc, DeadlineExceeded):
                message = "the service did not answer in time; is `tunedock up` running?"
            elif isinstance(exc, Unauthenticated):
                message += UNAUTHENTICATED_HINT
            fail(message, exit_code(exc))
        except JobDidNotSucceed as exc:
            fail(str(exc), 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError) as exc:
            fail(str(exc), 2)

    return wrapper


class JobDidNotSucceed(Exception):
    """A job the command followed ended failed or cancelled (commands exit 1 with this message)."""


def state_name(state: int) -> str:
    """A JobState as the CLI says it: "succeeded", "failed", ..."""
    from tunedock.v1 import trainer_pb2 as pb

    return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def succeeded(job, what: str = "job"):
    """`job` if it succeeded, else JobDidNotSucceed saying how it ended and why (every command that follows a job)."""
    from tunedock.v1 import trainer_pb2 as pb

    if job.state != pb.JOB_STATE_SUCCEEDED:
        raise JobDidNotSucceed(
            f"{what} {job.id} ended {state_name(job.state)}: {job.error or f'see `tunedock jobs get {job.id}`'}"
        )
    return job


def require(extra: str, modules: tuple[str, ...], what: str) -> None:
    """Commands that run server or training code say which extra a client-only install lacks."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        fail(
            f"{what} needs TuneDock's {extra} extra: pip install 'tunedock[{extra}]' (missing: {', '.join(missing)})", 2
        )


def print_json(message_or_obj) -> None:
    if hasattr(message_or_obj, "DESCRIPTOR"):
        message_or_obj = json_format.MessageToDict(message_or_obj)
    print(json.dumps(message_or_obj, indent=2, default=str))


def sparkline(values: list[float], width: int = 40) -> str:
    values = values[-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1)))] for v in values)
