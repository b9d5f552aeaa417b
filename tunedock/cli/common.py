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

from tunedock.errors import TuneDockError


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
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# How gRPC describes a server it could not reach at all (as opposed to one that answered UNAVAILABLE).
UNREACHABLE = ("failed to connect", "connections to all backends failing", "Connection refused", "DNS resolution")


def cli_errors(fn):
    """One clear line and a meaningful exit code instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TuneDockError as exc:
            if not callable(getattr(exc, "code", None)):
                fail(exc.message, 2)  # raised here, before any call: the input is wrong
            status = exc.status
            if status == "UNAVAILABLE":
                if any(sign in exc.message for sign in UNREACHABLE):
                    fail(
                        "cannot reach the TuneDock service; is `tunedock up` running? (addresses: --trainer/--registry/"
                        "--inference or TUNEDOCK_TRAINER_ADDRESS etc.)",
                        3,
                    )
                fail(exc.message, 3)  # the service answered: it says what is down
            if status == "DEADLINE_EXCEEDED":
                fail("the service did not answer in time; is `tunedock up` running?", 3)
            if status == "UNAUTHENTICATED":
                fail(f"{exc.message}; set TUNEDOCK_TOKEN (or TUNEDOCK_TOKEN_FILE) to a token from the admin", 5)
            fail(exc.message, 4 if status == "NOT_FOUND" else 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError) as exc:
            fail(str(exc), 2)

    return wrapper


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
