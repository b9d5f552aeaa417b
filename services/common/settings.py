"""Settings: one pydantic-settings model per service, filled from defaults < environment < flags, validated.

Every field documents itself (`setting(default, help)`); the same text becomes the `--flag` help.
Environment variables are `<ENV_PREFIX><FIELD_NAME>` upper-case (e.g. `TUNEDOCK_REGISTRY_PORT`),
read by pydantic-settings; `data_dir` also honours `TUNEDOCK_HOME`. Lists are comma-separated in
both. A settings object built in code (`TrainerSettings(port=0)`, tests, the local stack) is
exactly what it names: only `load()` reads the environment and the command line. A value that
does not parse or breaks a rule is refused naming the setting.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from tunedock.errors import InvalidArgument

S = TypeVar("S", bound="ServerSettings")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
CommaList = Annotated[list[str], NoDecode]
"""A list setting, written "a,b" in the environment and on the command line."""


def default_data_dir() -> Path:
    """$TUNEDOCK_HOME, else ~/.tunedock."""
    return Path(os.environ.get("TUNEDOCK_HOME", Path.home() / ".tunedock")).expanduser()


def setting(default: Any, help: str, **kwargs: Any) -> Any:
    """A documented settings field (a callable default is a factory)."""
    if callable(default) and not isinstance(default, type):
        return Field(default_factory=default, description=help, **kwargs)
    return Field(default=default, description=help, **kwargs)


class ServerSettings(BaseSettings):
    """Settings every TuneDock server has."""

    model_config = SettingsConfigDict(extra="forbid")

    ENV_PREFIX: ClassVar[str] = "TUNEDOCK_"
    SERVICE_NAME: ClassVar[str] = "server"
    DEFAULT_PORT: ClassVar[int] = 50050

    host: str = setting("127.0.0.1", "address to bind the gRPC server to")
    port: int = setting(-1, "gRPC port (0 picks a free one; -1 means the service's default port)")
    metrics_port: int = setting(0, "port of the Prometheus /metrics HTTP endpoint (0 picks a free one, -1 disables)")
    metrics_host: str = setting("", "address to bind /metrics to; empty: the gRPC host")
    metrics_token_file: str = setting(
        "", "file holding the bearer token a scraper must send for /metrics; empty: /metrics answers anyone"
    )
    data_dir: Path = setting(default_data_dir, "directory for the service's state (env TUNEDOCK_HOME)")
    log_level: str = setting("INFO", "log level: DEBUG, INFO, WARNING or ERROR")
    shutdown_grace_s: float = setting(5.0, "seconds in-flight RPCs get to finish on SIGTERM before they are cancelled")
    max_message_mb: int = setting(64, "largest gRPC message accepted or sent, in MiB")
    token_file: str = setting(
        "", "JSON file of hashed bearer tokens (tunedock tokens create); empty: authentication off, loopback only"
    )
    insecure: bool = setting(False, "allow binding a non-loopback address with authentication off (not for production)")
    tls_cert_file: str = setting("", "PEM server certificate (chain); with tls_key_file turns on TLS")
    tls_key_file: str = setting("", "PEM private key of tls_cert_file")
    tls_client_ca_file: str = setting(
        "", "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)"
    )
    max_streams_per_principal: int = setting(128, "streaming calls one caller may have open at once")
    rpc_timeout_s: float = setting(600.0, "server-side deadline of unary calls, seconds")
    upload_timeout_s: float = setting(21600.0, "server-side deadline of uploads (publish, dataset upload), seconds")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)  # the environment is `load()`'s to read (see the module docstring)

    @field_validator("*", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any, info: Any) -> Any:
        if isinstance(value, str) and typing.get_origin(cls.model_fields[info.field_name].annotation) is list:
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def model_post_init(self, context: Any, /) -> None:
        if self.port == -1:
            self.port = self.DEFAULT_PORT
        self.data_dir = Path(self.data_dir).expanduser()
        self.log_level = self.log_level.upper()
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be 0..65535, got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            problems.append(f"metrics_port must be -1..65535, got {self.metrics_port}")
        if self.log_level not in _LOG_LEVELS:
            problems.append(f"log_level must be one of {', '.join(_LOG_LEVELS)}, got {self.log_level!r}")
        if self.shutdown_grace_s < 0:
            problems.append(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        if self.max_message_mb <= 0:
            problems.append(f"max_message_mb must be > 0, got {self.max_message_mb}")
        if self.host not in ("localhost", "") and not _is_hostname(self.host):
            problems.append(f"host {self.host!r} is not an IP address or host name")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            problems.append("tls_cert_file and tls_key_file go together: give both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            problems.append("tls_client_ca_file (mTLS) needs TLS: give tls_cert_file and tls_key_file too")
        for name in ("token_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                problems.append(f"{name} {path!r} does not exist")
        if self.max_streams_per_principal < 1 or self.rpc_timeout_s <= 0 or self.upload_timeout_s <= 0:
            problems.append("max_streams_per_principal must be >= 1, rpc_timeout_s and upload_timeout_s > 0")
        if not self.token_file and not self.insecure and not is_loopback(self.host):
            problems.append(
                f"refusing to serve {self.host} without authentication: give --token-file "
                "(see `tunedock tokens create`), bind 127.0.0.1, or pass --insecure to accept the risk"
            )
        if problems:
            raise InvalidArgument("invalid settings: " + "; ".join(problems))

    @property
    def address(self) -> str:
        """host:port as gRPC wants it (IPv6 literals bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def load(cls: type[S], argv: list[str] | None = None, **overrides: Any) -> S:
        """Defaults, then environment, then `argv` flags, then `overrides`; validated."""
        values: dict[str, Any] = dict(EnvSettingsSource(cls, env_prefix=cls.ENV_PREFIX, case_sensitive=False)())
        if argv is not None:
            parsed = cls.argument_parser().parse_args(argv)
            values.update({k: v for k, v in vars(parsed).items() if v is not None})
        values.update(overrides)
        try:
            return cls(**values)
        except ValidationError as exc:
            raise InvalidArgument(_describe(cls, exc)) from None

    @classmethod
    def argument_parser(cls) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=f"python -m services.{cls.SERVICE_NAME}",
            description=f"TuneDock {cls.SERVICE_NAME} service. Every flag can also be set as "
            f"{cls.ENV_PREFIX}<FLAG> in the environment.",
        )
        for name, info in cls.model_fields.items():
            flag = "--" + name.replace("_", "-")
            if info.annotation is bool:
                parser.add_argument(
                    flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=info.description
                )
            else:  # text: the model converts it, and says which setting did not parse
                parser.add_argument(flag, dest=name, default=None, help=info.description)
        return parser


def _describe(cls: type[ServerSettings], exc: ValidationError) -> str:
    """One line per problem, each naming its setting."""
    lines = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "settings"
        annotation = cls.model_fields[name].annotation if name in cls.model_fields else None
        kind = getattr(typing.get_origin(annotation) or annotation, "__name__", str(annotation))
        if error["type"].endswith(("_parsing", "_type")):
            lines.append(f"setting {name}: cannot read {error['input']!r} as {kind}")
        else:
            lines.append(f"setting {name}: {error['msg']}")
    return "; ".join(lines)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_hostname(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return all(part and len(part) < 64 and part.replace("-", "").isalnum() for part in host.split("."))
