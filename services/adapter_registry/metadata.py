"""Registry metadata on SQLAlchemy: a SQLite file by default, PostgreSQL in production.

Writes are serialized: version numbers, alias moves and event ids must come out in one
order, and the event log must be gap-free in commit order so a watcher that resumes after
event N misses nothing. SQLite gets a process lock (one registry process owns the file);
PostgreSQL takes a transaction-scoped advisory lock, which also orders writers across
several registry replicas. Registry writes are rare next to reads, so this costs little.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import exists, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from services.adapter_registry.domain import Artifact, Event, NewVersion, StoredFile, Version
from services.adapter_registry.models import AliasRow, ArtifactRow, EventRow, FileRow, LabelRow, VersionRow
from services.common.db import is_sqlite, open_engine
from services.common.db import migrate as migrate_store
from services.common.pages import Page, bad_token, decode_token, encode_token
from services.common.pages import page_size as page_size_
from tunedock.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from tunedock.refs import LATEST, MAX_VERSION, Ref, parse_decimal

_WRITE_LOCK_KEY = 0x7D0C_4E61  # advisory lock id for registry writes (PostgreSQL)


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def migrate(url: str) -> None:
    """Bring the schema to the newest Alembic revision."""
    migrate_store(url, "services.adapter_registry")


class MetadataStore:
    """Versions, aliases and events. Sync API: the servicer calls it from worker threads."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = is_sqlite(url)
        self.engine = open_engine(url)
        try:
            migrate(url)
        except OperationalError as exc:
            raise Unavailable(f"cannot reach the metadata database {self.engine.url!r}: {exc.orig}") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._sessions() as session:
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._lock, self._sessions() as session, session.begin():
            if not self.is_sqlite:
                session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _WRITE_LOCK_KEY})
            yield session

    # ---- publish -------------------------------------------------------------------------

    def find_existing(self, name: str, content_sha256: str, idempotency_key: str = "") -> Version | None:
        """The version a publish would return instead of creating one: same key, else same content."""
        with self._read() as s:
            row = self._existing_row(s, name, content_sha256, idempotency_key)
            return self._version(s, row) if row else None

    @staticmethod
    def _existing_row(s: Session, name: str, content_sha256: str, idempotency_key: str) -> VersionRow | None:
        if idempotency_key:
            row = s.scalars(
                select(VersionRow).where(VersionRow.name == name, VersionRow.idempotency_key == idempotency_key)
            ).first()
            if row is not None:
                return row
        return s.scalars(
            select(VersionRow)
            .where(VersionRow.name == name, VersionRow.content_sha256 == content_sha256)
            .order_by(VersionRow.version.desc())
            .limit(1)
        ).first()

    def add_version(self, new: NewVersion) -> tuple[Version, bool]:
        """Commit a version (number = last + 1) and move `latest`; returns (version, created).

        Identical content, or an idempotency key used before, under the same name returns the
        existing version (created False).
        """
        now = _now()
        with self._write() as s:
            existing = self._existing_row(s, new.name, new.content_sha256, new.idempotency_key)
            if existing is not None:
                return self._version(s, existing), False
            artifact = s.get(ArtifactRow, new.name)
            if artifact is None:
                artifact = ArtifactRow(
                    name=new.name, kind=new.kind, project=new.project, last_version=0, created_at=now, updated_at=now
                )
                s.add(artifact)
            elif artifact.project != new.project:
                raise FailedPrecondition(f"artifact {new.name!r} belongs to another project")
            elif artifact.kind != new.kind:
                raise FailedPrecondition(
                    f"artifact {new.name!r} holds {artifact.kind} versions; publish a {new.kind} under another name"
                )
            artifact.last_version += 1
            artifact.updated_at = now
            row = VersionRow(
                name=new.name,
                version=artifact.last_version,
                kind=new.kind,
                content_sha256=new.content_sha256,
                size=new.size,
                base_model=new.base_model,
                lineage=new.lineage,
                labels=dict(new.labels),
                description=new.description,
                lora_rank=new.lora_rank,
                lora_alpha=new.lora_alpha,
                target_modules=list(new.target_modules),
                created_at=now,
                idempotency_key=new.idempotency_key or None,
                module_shapes=new.module_shapes or None,
                files=[FileRow(path=f.path, size=f.size, sha256=f.sha256) for f in new.files],
            )
            s.add(row)
            s.flush()
            s.add_all(LabelRow(version_id=row.id, key=k, value=v) for k, v in new.labels.items())
            self._set_alias_row(s, new.name, LATEST, row.version)
            s.add(
                EventRow(
                    type="published",
                    name=new.name,
                    version=row.version,
                    alias="",
                    content_sha256=new.content_sha256,
                    created_at=now,
                )
            )
            s.flush()
            return self._version(s, row), True

    # ---- reads ---------------------------------------------------------------------------

    def resolve(self, ref: Ref) -> Version:
        with self._read() as s:
            return self._version(s, self._resolve_row(s, ref))

    def _resolve_row(self, s: Session, ref: Ref) -> VersionRow:
        number = ref.version
        if number is None:
            alias = s.get(AliasRow, (ref.name, ref.alias))
            if alias is None:
                if s.get(ArtifactRow, ref.name) is None:
                    raise NotFound(f"artifact {ref.name!r} not found")
                raise NotFound(f"artifact {ref.name!r} has no alias {ref.alias!r}")
            number = alias.version
        row = s.scalars(select(VersionRow).where(VersionRow.name == ref.name, VersionRow.version == number)).first()
        if row is None:
            if s.get(ArtifactRow, ref.name) is None:
                raise NotFound(f"artifact {ref.name!r} not found")
            raise NotFound(f"artifact {ref.name!r} has no version {number}")
        return row

    def artifact_project(self, name: str) -> str | None:
        """The project an artifact belongs to, or None when no such artifact exists."""
        with self._read() as s:
            return s.scalar(select(ArtifactRow.project).where(ArtifactRow.name == name))

    def referenced_blobs(self) -> set[str]:
        with self._read() as s:
            return set(s.scalars(select(FileRow.sha256).distinct()))

    def list_artifacts(
        self,
        kind: str = "",
        base_model: str = "",
        labels: dict[str, str] | None = None,
        page_size: int = 50,
        page_token: str = "",
        projects: set[str] | None = None,
    ) -> Page:
        """`projects`: only artifacts in these projects (None: all)."""
        page_size = page_size_(page_size)
        after = decode_token(page_token)
        with self._read() as s:
            latest = (
                select(VersionRow.name, func.max(VersionRow.version).label("v")).group_by(VersionRow.name).subquery()
            )
            query = (
                select(ArtifactRow, VersionRow)
                .join(latest, latest.c.name == ArtifactRow.name)
                .join(VersionRow, (VersionRow.name == latest.c.name) & (VersionRow.version == latest.c.v))
                .order_by(ArtifactRow.name)
                .limit(page_size + 1)
            )
            if after:
                query = query.where(ArtifactRow.name > after)
            if projects is not None:
                query = query.where(ArtifactRow.project.in_(sorted(projects)))
            if kind:
                query = query.where(ArtifactRow.kind == kind)
            if base_model:
                query = query.where(VersionRow.base_model == base_model)
            for key, value in (labels or {}).items():
                query = query.where(
                    exists().where(
                        (LabelRow.version_id == VersionRow.id) & (LabelRow.key == key) & (LabelRow.value == value)
                    )
                )
            rows = s.execute(query).all()
            names = [a.name for a, _ in rows[:page_size]]
            aliases: dict[str, dict[str, int]] = {n: {} for n in names}
            for alias in s.scalars(select(AliasRow).where(AliasRow.name.in_(names))):
                aliases[alias.name][alias.alias] = alias.version
            items = [
                Artifact(
                    a.name,
                    a.kind,
                    v.version,
                    aliases[a.name],
                    v.base_model,
                    dict(v.labels),
                    _aware(a.updated_at),
                    a.project,
                )
                for a, v in rows[:page_size]
            ]
            return Page(items, encode_token(names[-1]) if len(rows) > page_size else "")

    def list_versions(self, name: str, page_size: int = 50, page_token: str = "") -> Page:
        page_size = page_size_(page_size)
        after = decode_token(page_token)
        with self._read() as s:
            if s.get(ArtifactRow, name) is None:
                raise NotFound(f"artifact {name!r} not found")
            query = select(VersionRow).where(VersionRow.name == name).order_by(VersionRow.version.desc())
            if after:
                before = parse_decimal(after, MAX_VERSION)
                if before is None:
                    raise bad_token()
                query = query.where(VersionRow.version < before)
            rows = list(s.scalars(query.limit(page_size + 1)))
            items = [self._version(s, r) for r in rows[:page_size]]
            return Page(items, encode_token(str(rows[page_size - 1].version)) if len(rows) > page_size else "")

    # ---- aliases and deletes -----------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int) -> tuple[Version, int]:
        if alias == LATEST:
            raise InvalidArgument("'latest' is maintained by the registry and cannot be set; pick another alias")
        with self._write() as s:
            row = self._resolve_row(s, Ref(name, version=version))
            previous = self._set_alias_row(s, name, alias, version)
            s.add(
                EventRow(
                    type="alias_moved",
                    name=name,
                    version=version,
                    alias=alias,
                    content_sha256=row.content_sha256,
                    created_at=_now(),
                )
            )
            s.flush()
            return self._version(s, row), previous

    def delete_alias(self, name: str, alias: str) -> int:
        if alias == LATEST:
            raise InvalidArgument("'latest' is maintained by the registry and cannot be deleted")
        with self._write() as s:
            row = s.get(AliasRow, (name, alias))
            if row is None:
                raise NotFound(f"artifact {name!r} has no alias {alias!r}")
            previous = row.version
            s.delete(row)
            s.add(
                EventRow(
                    type="alias_deleted", name=name, version=previous, alias=alias, content_sha256="", created_at=_now()
                )
            )
            return previous

    def delete_version(self, name: str, version: int, force: bool) -> tuple[list[str], set[str]]:
        """Delete a version; returns (aliases removed, blob hashes no longer referenced)."""
        with self._write() as s:
            row = self._resolve_row(s, Ref(name, version=version))
            pointing = list(s.scalars(select(AliasRow).where(AliasRow.name == name, AliasRow.version == version)))
            user_aliases = sorted(a.alias for a in pointing if a.alias != LATEST)
            if user_aliases and not force:
                raise FailedPrecondition(
                    f"{name}:{version} is pointed at by alias(es) {', '.join(user_aliases)}; move them first or "
                    "delete with force"
                )
            hashes = {f.sha256 for f in row.files}
            for alias in pointing:
                s.delete(alias)
            s.delete(row)
            s.flush()
            # latest falls back to the highest remaining version (numbers are never reused).
            remaining = s.scalar(select(func.max(VersionRow.version)).where(VersionRow.name == name))
            if LATEST in {a.alias for a in pointing} and remaining:
                self._set_alias_row(s, name, LATEST, remaining)
            now = _now()
            s.add(
                EventRow(
                    type="version_deleted",
                    name=name,
                    version=version,
                    alias="",
                    content_sha256=row.content_sha256,
                    created_at=now,
                )
            )
            still_used = set(s.scalars(select(FileRow.sha256).where(FileRow.sha256.in_(hashes))))
            return [a.alias for a in pointing], hashes - still_used

    # ---- events --------------------------------------------------------------------------

    def events_after(
        self, after_id: int, name: str = "", limit: int = 500, projects: set[str] | None = None
    ) -> list[Event]:
        with self._read() as s:
            query = select(EventRow).where(EventRow.id > after_id).order_by(EventRow.id).limit(limit)
            if name:
                query = query.where(EventRow.name == name)
            if projects is not None:
                visible = select(ArtifactRow.name).where(ArtifactRow.project.in_(sorted(projects)))
                query = query.where(EventRow.name.in_(visible))
            return [
                Event(e.id, e.type, e.name, e.version, e.alias, e.content_sha256, _aware(e.created_at))
                for e in s.scalars(query)
            ]

    def last_event_id(self) -> int:
        with self._read() as s:
            return s.scalar(select(func.max(EventRow.id))) or 0

    # ---- helpers -------------------------------------------------------------------------

    @staticmethod
    def _set_alias_row(s: Session, name: str, alias: str, version: int) -> int:
        row = s.get(AliasRow, (name, alias))
        if row is None:
            s.add(AliasRow(name=name, alias=alias, version=version))
            return 0
        previous, row.version = row.version, version
        return previous

    @staticmethod
    def _version(s: Session, row: VersionRow) -> Version:
        aliases = tuple(
            sorted(s.scalars(select(AliasRow.alias).where(AliasRow.name == row.name, AliasRow.version == row.version)))
        )
        return Version(
            name=row.name,
            version=row.version,
            kind=row.kind,
            files=tuple(StoredFile(f.path, f.size, f.sha256) for f in row.files),
            content_sha256=row.content_sha256,
            size=row.size,
            lineage=dict(row.lineage or {}),
            labels=dict(row.labels or {}),
            description=row.description,
            lora_rank=row.lora_rank,
            lora_alpha=row.lora_alpha,
            target_modules=tuple(row.target_modules or ()),
            aliases=aliases,
            created_at=_aware(row.created_at),
            project=_project_of(s, row.name),
            module_shapes=dict(row.module_shapes or {}),
        )


def _project_of(s: Session, name: str) -> str:
    """The artifact's project (the session's identity map: one read per artifact)."""
    artifact = s.get(ArtifactRow, name)
    if artifact is None:  # a version always has its artifact row; a missing one is a broken store
        raise NotFound(f"artifact {name!r} not found")
    return artifact.project
