"""A full disk is a status, not a crash: ENOSPC/EDQUOT become RESOURCE_EXHAUSTED saying what was
being written, where, and how much room is left there."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from tunedock.errors import InvalidArgument, ResourceExhausted

FULL = (errno.ENOSPC, errno.EDQUOT)


def is_full(exc: BaseException) -> bool:
    """A write failed for want of space: a full filesystem, a quota, or SQLite saying so."""
    if isinstance(exc, ResourceExhausted | InvalidArgument):
        return False  # already a status; a message may quote anything
    if isinstance(exc, OSError) and exc.errno in FULL:
        return True
    return "database or disk is full" in str(exc)


def free_bytes(path: Path) -> int | None:
    for candidate in (Path(path), *Path(path).parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(candidate).free
    return None


def _human(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def full_disk(what: str, where: Path | str, needed: int | None = None) -> ResourceExhausted:
    where = Path(where)
    need = f", needed ~{_human(needed)}" if needed else ""
    return ResourceExhausted(
        f"no space left on the device writing {what} to {where} ({_human(free_bytes(where))} free{need}): "
        "free space there or give it a larger volume, then try again"
    )


@contextlib.contextmanager
def disk_errors(what: str, where: Path | str, needed: int | None = None) -> Iterator[None]:
    """Turns a full disk inside the block into RESOURCE_EXHAUSTED (other errors pass)."""
    try:
        yield
    except Exception as exc:
        if is_full(exc):
            raise full_disk(what, where, needed) from exc
        raise


def close_quietly(handle) -> None:
    """Close a file whose buffered bytes may not fit any more: the descriptor is released either way
    (io's close closes the raw file even when its flush fails), so deleted staging files free their space."""
    with contextlib.suppress(OSError):
        handle.close()
    raw = getattr(handle, "raw", None)
    if raw is not None and not raw.closed:
        with contextlib.suppress(OSError):
            raw.close()
