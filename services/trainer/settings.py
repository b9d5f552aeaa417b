"""Trainer settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from services.common.errors import InvalidArgument
from services.common.settings import ServerSettings, setting


@dataclass
class TrainerSettings(ServerSettings):
    """Settings of `python -m services.trainer`."""

    ENV_PREFIX: ClassVar[str] = "TUNEDOCK_TRAINER_"
    SERVICE_NAME: ClassVar[str] = "trainer"
    DEFAULT_PORT: ClassVar[int] = 50051

    database_url: str = setting("", "SQLAlchemy URL of the job store; empty means sqlite:///<data-dir>/trainer/jobs.db")
    registry_address: str = setting("127.0.0.1:50052", "address of the adapter registry that outputs are published to")
    max_concurrent_jobs: int = setting(1, "jobs that train at the same time; the rest queue")
    max_attempts: int = setting(3, "worker starts per job (resumes from the last checkpoint after a crash)")
    max_dataset_mb: int = setting(1024, "largest dataset upload accepted, in MiB")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_concurrent_jobs < 1:
            raise InvalidArgument(f"max_concurrent_jobs must be >= 1, got {self.max_concurrent_jobs}")
        if self.max_attempts < 1:
            raise InvalidArgument(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'trainer' / 'jobs.db'}"
