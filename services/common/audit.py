"""Audit log: who did what to which item, and when, as one structured log line per action.

Lines go to the `tunedock.audit` logger (JSON like every other line, with `"audit": true`),
so a log pipeline can route them apart. Written after the action took effect.
"""

from __future__ import annotations

import logging

from services.common.auth import principal

log = logging.getLogger("tunedock.audit")


def audit(action: str, target: str, project: str = "", **details) -> None:
    who = principal()
    log.info(
        "%s %s %s",
        who.name,
        action,
        target,
        extra={"audit": True, "principal": who.name, "action": action, "target": target, "project": project, **details},
    )
