"""Check that a virtual environment holds exactly what a lock file names.

    python scripts/check_env.py requirements/cpu.lock            # exit 1 and list every difference
    python scripts/check_env.py requirements/cpu.lock --prune    # uninstall what the lock does not name

Run it with the environment's own interpreter (`.venv/bin/python`). Every installed
distribution must appear in the lock with the same version, and every locked one must be
installed. Two are exempt: the project itself (installed editable from the working tree)
and pip (the installer; scripts/setup.sh pins its version).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

EXEMPT = {"tunedock", "pip"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalize(name: str) -> str:
    """PEP 503: names compare case-insensitively with runs of -, _ and . equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[normalize(match[1])] = match[2]
    if not pins:
        raise SystemExit(f"{path}: no 'name==version' lines; is it a lock file?")
    return pins


def installed() -> dict[str, str]:
    return {normalize(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def differences(locked: dict[str, str], present: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """(extra, missing, wrong version) as printable lines."""
    extra = sorted(n for n in present if n not in locked and n not in EXEMPT)
    missing = sorted(n for n in locked if n not in present and n not in EXEMPT)
    wrong = sorted(
        f"{n}: installed {present[n]}, locked {locked[n]}"
        for n in locked
        if n in present and present[n] != locked[n] and n not in EXEMPT
    )
    return extra, missing, wrong


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path)
    parser.add_argument("--prune", action="store_true", help="uninstall distributions the lock does not name")
    args = parser.parse_args(argv)
    locked = read_lock(args.lock)
    extra, missing, wrong = differences(locked, installed())
    if args.prune and extra:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *extra], check=True)
        extra, missing, wrong = differences(locked, installed())
    problems = [f"not in {args.lock}: {n}=={installed()[n]}" for n in extra]
    problems += [f"missing (locked): {n}=={locked[n]}" for n in missing]
    problems += [f"wrong version: {line}" for line in wrong]
    if problems:
        print(f"{sys.prefix} does not match {args.lock}:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        print(
            "fix: rm -rf .venv && make setup  (or add the package to pyproject.toml and run make lock)", file=sys.stderr
        )
        return 1
    print(f"{sys.prefix}: {len(locked)} locked distributions, all installed at their locked versions, nothing else")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
