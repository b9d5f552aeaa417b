"""Registry tables (SQLAlchemy). Schema changes go through Alembic migrations in `migrations/`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class ArtifactRow(Base):
    __tablename__ = "artifacts"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    # Tenant: callers see and use only their projects' artifacts.
    project: Mapped[str] = mapped_column(String(64), default="default", server_default="default", index=True)
    # Highest version number ever given out; never decreases, so numbers are never reused.
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_versions_name_version"),
        Index("ix_versions_name_content", "name", "content_sha256"),
        Index("ix_versions_base_model", "base_model"),
        UniqueConstraint("name", "idempotency_key", name="uq_versions_name_idempotency_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(ForeignKey("artifacts.name"))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    content_sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    base_model: Mapped[str] = mapped_column(String(512), default="")
    lineage: Mapped[dict] = mapped_column(JSON, default=dict)
    labels: Mapped[dict] = mapped_column(JSON, default=dict)
    description: Mapped[str] = mapped_column(Text, default="")
    lora_rank: Mapped[int] = mapped_column(Integer, default=0)
    lora_alpha: Mapped[float] = mapped_column(Float, default=0.0)
    target_modules: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # NULL when the publisher gave no key (NULLs never collide in the unique constraint).
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True, default=None)
    # LoRA adapters: {"layers.N.<module>": [in, out]} (services/common/lora_shapes.py).
    module_shapes: Mapped[dict | None] = mapped_column(JSON, nullable=True, default=None)

    files: Mapped[list[FileRow]] = relationship(
        back_populates="version", cascade="all, delete-orphan", order_by="FileRow.path", lazy="selectin"
    )


class FileRow(Base):
    __tablename__ = "files"
    __table_args__ = (Index("ix_files_sha256", "sha256"),)

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(String(255), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))

    version: Mapped[VersionRow] = relationship(back_populates="files")


class AliasRow(Base):
    __tablename__ = "aliases"

    name: Mapped[str] = mapped_column(ForeignKey("artifacts.name"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class LabelRow(Base):
    __tablename__ = "labels"
    __table_args__ = (Index("ix_labels_key_value", "key", "value"),)

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(String(512))


class EventRow(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    type: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    alias: Mapped[str] = mapped_column(String(64), default="")
    content_sha256: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
