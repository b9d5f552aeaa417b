"""Artifact names, aliases and references: `name`, `name:3`, `name@alias`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunedock.errors import InvalidArgument

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
LATEST = "latest"
# ASCII digits only: str.isdigit() also accepts '²' or '٣', which int() then refuses.
DECIMAL_RE = re.compile(r"^[0-9]{1,18}$")
MAX_VERSION = 2**31 - 1  # versions are 32-bit integers in every metadata backend


def parse_decimal(text: str, maximum: int = 2**63 - 1) -> int | None:
    """A non-negative integer written in ASCII digits, at most `maximum`; None if `text` is not one."""
    if not DECIMAL_RE.match(text or ""):
        return None
    value = int(text)
    return value if value <= maximum else None


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise InvalidArgument(
            f"invalid artifact name {name!r}: use 1-128 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_version(version: int) -> int:
    if not 1 <= version <= MAX_VERSION:
        raise InvalidArgument(f"version must be from 1 to {MAX_VERSION}, got {version}")
    return version


def check_alias(alias: str) -> str:
    if not ALIAS_RE.match(alias or ""):
        raise InvalidArgument(
            f"invalid alias {alias!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return alias


@dataclass(frozen=True)
class Ref:
    """A parsed reference: exactly one of `version` / `alias` is set (a bare name means alias latest)."""

    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, text: str) -> Ref:
        text = (text or "").strip()
        if not text:
            raise InvalidArgument("empty reference: use 'name', 'name:3' or 'name@alias'")
        if "@" in text:
            name, _, alias = text.partition("@")
            return cls(check_name(name), alias=check_alias(alias))
        if ":" in text:
            name, _, number = text.partition(":")
            version = parse_decimal(number, MAX_VERSION)
            if version is None or version < 1:
                raise InvalidArgument(
                    f"invalid reference {text!r}: the version after ':' must be a number from 1 to {MAX_VERSION} "
                    "in ASCII digits"
                )
            return cls(check_name(name), version=version)
        return cls(check_name(text), alias=LATEST)

    def __str__(self) -> str:
        return f"{self.name}:{self.version}" if self.version is not None else f"{self.name}@{self.alias}"
