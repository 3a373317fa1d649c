"""The registry database's tables, as SQLAlchemy declarative models.

Owns the shape of the data; it does not create tables (only the Alembic migrations in
``migrations/`` change the schema, and a test checks that they agree with these models) and is
never seen outside ``vk_provider.registry`` (the repository converts rows into domain values).
docs/registry.md documents every table, column and view for people querying with ``sqlite3``.

Times are stored in UTC. On SQLite they are text ``YYYY-MM-DD HH:MM:SS.ffffff`` (sortable, and
understood by SQLite's date functions); ``UtcDateTime`` makes them timezone-aware again on read.
Sizes are bytes unless the column name says otherwise; durations are simulated seconds.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Named constraints let SQLite batch migrations find and alter them later."""

VIEW_NAMES = frozenset({"cache_overview", "pod_start_by_outcome", "pod_start_per_image", "image_overview"})
"""Views are created by the migrations with plain SQL; autogenerate must not treat them as tables."""

CACHE_PHASES = ("Preparing", "Creating", "Ready", "Failed", "Updating", "UpdateFailed")
CACHE_OUTCOMES = ("explicit_hit", "auto_hit", "partial", "miss", "none", "failed")
IMAGE_SOURCES = ("catalog", "registry", "synthetic")


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite has no time zone type: SQLAlchemy writes the wall-clock digits and drops the offset,
    so values are converted to UTC before writing and marked UTC after reading. Naive datetimes
    are refused rather than guessed.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} given; the registry stores aware UTC times")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: dict[Any, Any] = {datetime: UtcDateTime}


class LayerRow(Base):
    """``layers``: one row per layer digest, however many images share it."""

    __tablename__ = "layers"

    digest: Mapped[str] = mapped_column(String(100), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    uncompressed_size_bytes: Mapped[int] = mapped_column(BigInteger)


class ImageRow(Base):
    """``images``: a resolved image manifest (the manifest store), keyed by normalised reference."""

    __tablename__ = "images"
    __table_args__ = (CheckConstraint(_in("source", IMAGE_SOURCES), name="source"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    reference: Mapped[str] = mapped_column(String(512), unique=True)
    digest: Mapped[str] = mapped_column(String(100))
    source: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    uncompressed_size_bytes: Mapped[int] = mapped_column(BigInteger)
    resolved_at: Mapped[datetime | None]


class ImageLayerRow(Base):
    """``image_layers``: which layers make an image, in manifest order (``position`` from 0)."""

    __tablename__ = "image_layers"

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    layer_digest: Mapped[str] = mapped_column(ForeignKey("layers.digest"), index=True)


class CacheRow(Base):
    """``caches``: one ImageCache (``imc_id`` is its ``status.imageCacheId``, ``name`` its name).

    ``hit_count`` counts the Pods it was chosen for; ``automatic`` marks caches created by a
    miss (``auto-create-for-…``) rather than by a user.
    """

    __tablename__ = "caches"
    __table_args__ = (
        CheckConstraint(_in("phase", CACHE_PHASES), name="phase"),
        CheckConstraint("progress BETWEEN 0 AND 100", name="progress"),
        Index("ix_caches_phase_expires_at", "phase", "expires_at"),
        Index("ix_caches_automatic_last_matched_at", "automatic", "last_matched_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    imc_id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(253), unique=True)
    phase: Mapped[str] = mapped_column(String(16))
    progress: Mapped[int] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text)
    size_gib: Mapped[int] = mapped_column(Integer)
    automatic: Mapped[bool] = mapped_column(Boolean)
    hit_count: Mapped[int] = mapped_column(Integer)
    labels: Mapped[dict[str, str]] = mapped_column(JSON)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    last_matched_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]


class CacheImageRow(Base):
    """``cache_images``: the images a cache holds (or will hold), in ``spec.images`` order."""

    __tablename__ = "cache_images"

    cache_id: Mapped[int] = mapped_column(ForeignKey("caches.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    reference: Mapped[str] = mapped_column(String(512), index=True)
    digest: Mapped[str] = mapped_column(String(100))
    size_bytes: Mapped[int] = mapped_column(BigInteger)


class CacheEventRow(Base):
    """``cache_events``: a cache's ``status.events`` (the latest 50, identical ones counted)."""

    __tablename__ = "cache_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cache_id: Mapped[int] = mapped_column(ForeignKey("caches.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    count: Mapped[int] = mapped_column(Integer)
    first_timestamp: Mapped[datetime]
    last_timestamp: Mapped[datetime]


class PodStartRow(Base):
    """``pod_starts``: one row per Pod start, unique by Pod UID so a restarted agent never counts twice.

    ``imc_id`` is deliberately not a foreign key: deleting a cache must not erase the history
    of the Pods that used it.
    """

    __tablename__ = "pod_starts"
    __table_args__ = (
        CheckConstraint(_in("cache_outcome", CACHE_OUTCOMES), name="cache_outcome"),
        Index("ix_pod_starts_namespace_started_at", "namespace", "started_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pod_uid: Mapped[str] = mapped_column(String(64), unique=True)
    namespace: Mapped[str] = mapped_column(String(253))
    name: Mapped[str] = mapped_column(String(253))
    node: Mapped[str] = mapped_column(String(253))
    cache_outcome: Mapped[str] = mapped_column(String(16))
    imc_id: Mapped[str | None] = mapped_column(String(64), index=True)
    cache_reason: Mapped[str] = mapped_column(Text)
    bytes_pulled: Mapped[int] = mapped_column(BigInteger)
    resolve_seconds: Mapped[float] = mapped_column(Float)
    snapshot_attach_seconds: Mapped[float] = mapped_column(Float)
    pull_seconds: Mapped[float] = mapped_column(Float)
    container_start_seconds: Mapped[float] = mapped_column(Float)
    startup_seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime]
    started_at: Mapped[datetime] = mapped_column(index=True)
    labels: Mapped[dict[str, str]] = mapped_column(JSON)


class PodStartImageRow(Base):
    """``pod_start_images``: each image of a Pod start, with what its pull cost."""

    __tablename__ = "pod_start_images"

    pod_start_id: Mapped[int] = mapped_column(ForeignKey("pod_starts.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    reference: Mapped[str] = mapped_column(String(512), index=True)
    bytes_pulled: Mapped[int] = mapped_column(BigInteger)
    pull_seconds: Mapped[float] = mapped_column(Float)
    from_cache: Mapped[bool] = mapped_column(Boolean)
