"""Trainer persistence: datasets, jobs and their event logs (SQLite by default, PostgreSQL too).

Job specs and events are the trainer's domain models (services/trainer/domain.py), stored as
their JSON: the store owns its schema, and a watcher replays exactly what was reported.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import JSON, Boolean, DateTime, Integer, String, Text, and_, func, or_, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from services.common.db import migrate, open_engine
from services.common.pages import Page, bad_token, decode_token, page_size, token_after
from services.trainer.domain import JobEvent, JobSpec
from tunedock.errors import NotFound, Unavailable

TERMINAL = ("succeeded", "failed", "cancelled")


class Base(DeclarativeBase):
    pass


class DatasetRow(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    num_records: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    project: Mapped[str] = mapped_column(String(64), default="default", server_default="default", index=True)
    ignored_columns: Mapped[list | None] = mapped_column(JSON, nullable=True, default=list)
    stats: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    """What validation measured (DatasetStats' fields); None for datasets stored before it did."""


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    spec: Mapped[dict] = mapped_column(JSON)
    """The JobSpec model's JSON."""
    state: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str] = mapped_column(Text, default="")
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    output_ref: Mapped[str] = mapped_column(String(200), default="")
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    project: Mapped[str] = mapped_column(String(64), default="default", server_default="default", index=True)
    # Attempts that ended for the job's own reasons (what max_attempts bounds); `attempt` also
    # counts restarts caused by the platform (a trainer restart, a registry outage).
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class JobEventRow(Base):
    __tablename__ = "job_events"
    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    event: Mapped[dict] = mapped_column(JSON)
    """The JobEvent model's JSON (its sequence is `seq`)."""


@dataclass
class JobRecord:
    id: str
    spec: JobSpec
    state: str
    error: str
    step: int
    total_steps: int
    attempt: int
    output_ref: str
    metrics: dict
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    project: str = "default"
    failures: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _aware_required(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _record(row: JobRow) -> JobRecord:
    return JobRecord(
        row.id,
        JobSpec.model_validate(row.spec),
        row.state,
        row.error,
        row.step,
        row.total_steps,
        row.attempt,
        row.output_ref,
        dict(row.metrics or {}),
        row.cancel_requested,
        _aware_required(row.created_at),
        _aware(row.started_at),
        _aware(row.ended_at),
        row.project,
        row.failures or 0,
    )


def _keyset(session, query, table, size: int, token: str, convert: Callable) -> Page:
    """A page of `query` newest first, by (created_at, id) descending, after the item `token` names."""
    size = page_size(size)
    after = decode_token(token)
    if after:
        when, _, last_id = after.partition("|")
        try:
            created = datetime.fromisoformat(when)
        except ValueError:
            raise bad_token() from None
        if not last_id:
            raise bad_token()
        query = query.where(or_(table.created_at < created, and_(table.created_at == created, table.id < last_id)))
    rows = list(session.scalars(query.order_by(table.created_at.desc(), table.id.desc()).limit(size + 1)))
    items = [convert(r) for r in rows[:size]]
    if len(rows) <= size:
        return Page(items)
    last = rows[size - 1]
    return Page(items, token_after(_aware_required(last.created_at).isoformat(), last.id))


class JobStore:
    """Sync API; the service calls it from worker threads. Writes are serialized in-process."""

    def __init__(self, url: str) -> None:
        self.engine = open_engine(url)
        try:
            migrate(url, "services.trainer")
        except OperationalError as exc:
            raise Unavailable(f"cannot reach the job store {self.engine.url!r}: {exc.orig}") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self):
        with self._lock, self._sessions() as s, s.begin():
            yield s

    # datasets
    def add_dataset(self, row: DatasetRow) -> DatasetRow:
        with self._write() as s:
            existing = s.get(DatasetRow, row.id)
            if existing is not None:
                return existing
            s.add(row)
            return row

    def get_dataset(self, dataset_id: str) -> DatasetRow:
        with self._sessions() as s:
            row = s.get(DatasetRow, dataset_id)
            if row is None:
                raise NotFound(f"dataset {dataset_id!r} not found; upload it with `tunedock data upload FILE`")
            return row

    def list_datasets(self, page_size: int, page_token: str = "", projects: set[str] | None = None) -> Page[DatasetRow]:
        """Newest first, keyset-paged; `projects`: only these (None: all)."""
        with self._sessions() as s:
            query = select(DatasetRow)
            if projects is not None:
                query = query.where(DatasetRow.project.in_(sorted(projects)))
            return _keyset(s, query, DatasetRow, page_size, page_token, lambda row: row)

    def delete_dataset(self, dataset_id: str) -> str | None:
        """Remove a dataset's row; the sha256 of its bytes when no other dataset (another project's
        upload of the same bytes) still holds them, so the caller may delete the blob; None otherwise."""
        with self._write() as s:
            row = s.get(DatasetRow, dataset_id)
            if row is None:
                raise NotFound(f"dataset {dataset_id!r} not found")
            sha = row.sha256
            s.delete(row)
            s.flush()
            shared = s.scalar(select(func.count()).select_from(DatasetRow).where(DatasetRow.sha256 == sha))
            return None if shared else sha

    def unfinished_jobs(self) -> list[JobRecord]:
        """Jobs not yet ended (validating, queued, running), oldest first."""
        with self._sessions() as s:
            query = select(JobRow).where(JobRow.state.not_in(TERMINAL)).order_by(JobRow.created_at, JobRow.id)
            return [_record(r) for r in s.scalars(query)]

    # jobs
    def add_job(self, job_id: str, spec: JobSpec, event: JobEvent, project: str = "default") -> JobRecord:
        with self._write() as s:
            row = JobRow(
                id=job_id,
                spec=spec.model_dump(mode="json"),
                state="queued",
                created_at=now(),
                metrics={},
                last_seq=1,
                project=project,
            )
            s.add(row)
            s.add(JobEventRow(job_id=job_id, seq=1, event=_event_json(event)))
            return _record(row)

    def get_job(self, job_id: str) -> JobRecord:
        with self._sessions() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"job {job_id!r} not found")
            return _record(row)

    def list_jobs(
        self, state: str, page_size: int, page_token: str = "", projects: set[str] | None = None
    ) -> Page[JobRecord]:
        """Newest first, keyset-paged, optionally in one state; `projects`: only these (None: all)."""
        with self._sessions() as s:
            query = select(JobRow)
            if projects is not None:
                query = query.where(JobRow.project.in_(sorted(projects)))
            if state:
                query = query.where(JobRow.state == state)
            return _keyset(s, query, JobRow, page_size, page_token, _record)

    def jobs_in_state(self, state: str) -> list[JobRecord]:
        with self._sessions() as s:
            query = select(JobRow).where(JobRow.state == state).order_by(JobRow.created_at, JobRow.id)
            return [_record(r) for r in s.scalars(query)]

    def count_state(self, state: str) -> int:
        with self._sessions() as s:
            return s.scalar(select(func.count()).select_from(JobRow).where(JobRow.state == state)) or 0

    def update(self, job_id: str, events: list[JobEvent] | None = None, **fields) -> tuple[JobRecord, list[int]]:
        """Set fields and append events (sequence numbers assigned here) in one transaction."""
        with self._write() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"job {job_id!r} not found")
            for key, value in fields.items():
                setattr(row, key, value)
            seqs = []
            for event in events or []:
                row.last_seq += 1
                s.add(JobEventRow(job_id=job_id, seq=row.last_seq, event=_event_json(event)))
                seqs.append(row.last_seq)
            return _record(row), seqs

    def events_after(self, job_id: str, after: int) -> list[JobEvent]:
        """The job's events after sequence `after`, in order, each with its sequence."""
        with self._sessions() as s:
            query = select(JobEventRow).where(JobEventRow.job_id == job_id, JobEventRow.seq > after)
            return [
                JobEvent.model_validate({**e.event, "sequence": e.seq})
                for e in s.scalars(query.order_by(JobEventRow.seq))
            ]

    def events_before(self, job_id: str, before: int, limit: int) -> list[JobEvent]:
        """At most `limit` of the job's events with a sequence below `before` (0: from the newest), newest first."""
        with self._sessions() as s:
            query = select(JobEventRow).where(JobEventRow.job_id == job_id)
            if before:
                query = query.where(JobEventRow.seq < before)
            rows = s.scalars(query.order_by(JobEventRow.seq.desc()).limit(limit))
            return [JobEvent.model_validate({**e.event, "sequence": e.seq}) for e in rows]


def _event_json(event: JobEvent) -> dict:
    return event.model_dump(mode="json", exclude_none=True, exclude={"sequence"})
