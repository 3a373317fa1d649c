"""The registry repository: reads and writes the registry database in domain values.

Owns every query. Methods take and return values from ``vk_provider.domain`` (ImageCache,
ImageManifest, PodStartRecord, …), never ORM rows, and each call is one unit of work with its
own ``AsyncSession``: short transactions keep the SQLite write lock brief for other writers and
for people reading the file with ``sqlite3``. Writes begin with ``BEGIN IMMEDIATE`` on SQLite
(see ``engine``). It does not create the schema (``migrate``) and holds no state between calls.

On PostgreSQL (a registry shared by several agents) the same statements run; where SQLite's
``BEGIN IMMEDIATE`` serialised writers for free, rows are locked explicitly (``FOR UPDATE``) or
written with one ``INSERT … ON CONFLICT`` statement, so concurrent agents neither lose updates
nor fail on an insert race.

Reads of many caches take two queries (caches, then all their images), and of many Pod starts
one joined query, whatever their number: never a query per cache.
"""

from __future__ import annotations

import asyncio
import enum
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Row, case, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from vk_provider.domain.model import CachedImage, CachePhase, ImageCache, ImageManifest, Layer
from vk_provider.domain.records import (
    CacheEvent,
    CacheOutcome,
    ImagePullRecord,
    PodStartRecord,
    merge_cache_event,
)
from vk_provider.registry.engine import WRITE_OPTION
from vk_provider.registry.schema import (
    CacheEventRow,
    CacheImageRow,
    CacheRow,
    ImageLayerRow,
    ImageRow,
    LayerRow,
    PodStartImageRow,
    PodStartRow,
)

_T = TypeVar("_T")
_CHUNK = 500
"""Bound parameters per IN list: far below SQLite's limit, and PostgreSQL's."""


class Unset(enum.Enum):
    """Marks an argument that was not given, where None is a meaningful value."""

    UNSET = "unset"


UNSET = Unset.UNSET


class CacheConflictError(ValueError):
    """Two caches would share one ImageCache ID."""


def _labelled(column: Any, labels: Mapping[str, str]) -> list[ColumnElement[bool]]:
    """Conditions that the JSON ``column`` of labels includes every one of ``labels`` (SQLite's
    json_extract, PostgreSQL's ->>, through SQLAlchemy's JSON index)."""
    return [column[key].as_string() == value for key, value in labels.items()]


def _chunks(items: Sequence[_T], size: int = _CHUNK) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_CACHE_COLUMNS = (
    CacheRow.id,
    CacheRow.imc_id,
    CacheRow.name,
    CacheRow.phase,
    CacheRow.progress,
    CacheRow.message,
    CacheRow.size_gib,
    CacheRow.automatic,
    CacheRow.labels,
    CacheRow.created_at,
    CacheRow.last_matched_at,
    CacheRow.expires_at,
)


_POD_START_COLUMNS = (
    PodStartRow.id,
    PodStartRow.pod_uid,
    PodStartRow.namespace,
    PodStartRow.name,
    PodStartRow.node,
    PodStartRow.cache_outcome,
    PodStartRow.imc_id,
    PodStartRow.cache_reason,
    PodStartRow.resolve_seconds,
    PodStartRow.snapshot_attach_seconds,
    PodStartRow.container_start_seconds,
    PodStartRow.startup_seconds,
    PodStartRow.created_at,
    PodStartRow.started_at,
    PodStartRow.labels,
)


def _pod_start_values(record: PodStartRecord) -> dict[str, Any]:
    return {
        "pod_uid": record.pod_uid,
        "namespace": record.namespace,
        "name": record.name,
        "node": record.node,
        "cache_outcome": record.outcome.value,
        "imc_id": record.imc_id,
        "cache_reason": record.reason,
        "bytes_pulled": record.bytes_pulled,
        "resolve_seconds": record.resolve_seconds,
        "snapshot_attach_seconds": record.snapshot_attach_seconds,
        "pull_seconds": record.pull_seconds,
        "container_start_seconds": record.container_start_seconds,
        "startup_seconds": record.startup_seconds,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "labels": dict(record.labels),
    }


def _cache_from_row(row: Any, images: Sequence[CachedImage]) -> ImageCache:
    return ImageCache(
        imc_id=row.imc_id,
        name=row.name,
        phase=CachePhase(row.phase),
        size_gib=row.size_gib,
        images=tuple(images),
        automatic=row.automatic,
        created_at=row.created_at,
        progress=row.progress,
        last_matched_at=row.last_matched_at,
        expires_at=row.expires_at,
        message=row.message,
        labels=tuple(row.labels.items()),
    )


def _pod_starts_from_rows(rows: Iterable[Row[Any]]) -> tuple[PodStartRecord, ...]:
    records: list[PodStartRecord] = []
    current: Row[Any] | None = None
    images: list[ImagePullRecord] = []

    def flush() -> None:
        if current is not None:
            records.append(
                PodStartRecord(
                    pod_uid=current.pod_uid,
                    namespace=current.namespace,
                    name=current.name,
                    node=current.node,
                    outcome=CacheOutcome(current.cache_outcome),
                    imc_id=current.imc_id,
                    reason=current.cache_reason,
                    images=tuple(images),
                    resolve_seconds=current.resolve_seconds,
                    snapshot_attach_seconds=current.snapshot_attach_seconds,
                    container_start_seconds=current.container_start_seconds,
                    startup_seconds=current.startup_seconds,
                    created_at=current.created_at,
                    started_at=current.started_at,
                    labels=tuple(current.labels.items()),
                )
            )

    for row in rows:
        if current is None or row.id != current.id:
            flush()
            current, images = row, []
        if row.image_reference is not None:
            images.append(
                ImagePullRecord(
                    reference=row.image_reference,
                    bytes_pulled=row.image_bytes_pulled,
                    pull_seconds=row.image_pull_seconds,
                    from_cache=row.from_cache,
                )
            )
    flush()
    return tuple(records)


# The transaction (and its registry) the running task is inside, if any: see Registry.transaction.
_TRANSACTION: ContextVar[tuple[Registry, AsyncSession, asyncio.Task[Any] | None] | None] = ContextVar(
    "registry_transaction", default=None
)


class Registry:
    """The registry database, in domain values. Safe to share between tasks of one event loop.

    Made by ``engine.open_registry``; ``close()`` releases its connections.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._read_sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._write_sessions = async_sessionmaker(
            engine.execution_options(**{WRITE_OPTION: True}), expire_on_commit=False
        )

    @property
    def engine(self) -> AsyncEngine:
        """For migrations (``migrate.upgrade(registry.engine)``) and tests; not for queries."""
        return self._engine

    async def close(self) -> None:
        await self._engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Everything this task does with the registry inside is one transaction: all of it is
        written, or (an error, a cancellation, Ctrl-C) none of it. Other tasks are not part of it."""
        if self._current() is not None:
            yield  # already inside one
            return
        async with self._write_sessions() as session, session.begin():
            token = _TRANSACTION.set((self, session, asyncio.current_task()))
            try:
                yield
            finally:
                _TRANSACTION.reset(token)

    def _current(self) -> AsyncSession | None:
        # Tasks started inside inherit the context variable, not the transaction: only its own task.
        inside = _TRANSACTION.get()
        if inside is None or inside[0] is not self or inside[2] is not asyncio.current_task():
            return None
        return inside[1]

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[AsyncSession]:
        current = self._current()
        if current is not None:  # inside a transaction: read what it wrote
            yield current
            return
        async with self._read_sessions() as session:
            yield session

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncSession]:
        current = self._current()
        if current is not None:
            yield current
            return
        async with self._write_sessions() as session, session.begin():
            yield session

    def _insert(self, session: AsyncSession, entity: Any) -> Any:
        """A dialect INSERT, for ON CONFLICT clauses (SQLite and PostgreSQL spell them alike)."""
        dialect = session.get_bind().dialect.name
        if dialect == "postgresql":
            return postgresql.insert(entity)
        if dialect == "sqlite":
            return sqlite.insert(entity)
        raise NotImplementedError(f"the registry supports SQLite and PostgreSQL, not {dialect}")

    # ---- caches -------------------------------------------------------------------------------

    async def upsert_cache(self, cache: ImageCache, *, now: datetime) -> ImageCache:
        """Create or update the cache named ``cache.name``; return it as stored.

        Everything in ``cache`` is written, except that a stored ``last_matched_at`` newer than
        the given one is kept (matching and resyncing may race), and the hit count is kept.
        Raises CacheConflictError if another cache already has ``cache.imc_id``.
        """
        async with self._writing() as session:
            await self._upsert_caches(session, [cache], now)
            stored = await self._select_caches(session, CacheRow.name == cache.name)
        return stored[0]

    async def upsert_caches(self, caches: Iterable[ImageCache], *, now: datetime) -> int:
        """``upsert_cache`` for many caches in one transaction (e.g. a resync); returns the count."""
        by_name = {cache.name: cache for cache in caches}
        async with self._writing() as session:
            await self._upsert_caches(session, list(by_name.values()), now)
        return len(by_name)

    async def _upsert_caches(self, session: AsyncSession, caches: Sequence[ImageCache], now: datetime) -> None:
        existing: dict[str, tuple[int, datetime | None]] = {}
        for names in _chunks([cache.name for cache in caches]):
            result = await session.execute(
                select(CacheRow.id, CacheRow.name, CacheRow.last_matched_at).where(CacheRow.name.in_(names))
            )
            existing.update({row.name: (row.id, row.last_matched_at) for row in result})

        def values(cache: ImageCache, stored_matched_at: datetime | None) -> dict[str, Any]:
            matched = [t for t in (cache.last_matched_at, stored_matched_at) if t is not None]
            return {
                "imc_id": cache.imc_id,
                "name": cache.name,
                "phase": cache.phase.value,
                "progress": cache.progress,
                "message": cache.message,
                "size_gib": cache.size_gib,
                "automatic": cache.automatic,
                "labels": dict(cache.labels),
                "created_at": cache.created_at,
                "updated_at": now,
                "last_matched_at": max(matched) if matched else None,
                "expires_at": cache.expires_at,
            }

        ids: dict[str, int] = {name: cache_id for name, (cache_id, _) in existing.items()}
        updates = [{"id": existing[c.name][0], **values(c, existing[c.name][1])} for c in caches if c.name in existing]
        inserts = [{**values(c, None), "hit_count": 0} for c in caches if c.name not in existing]
        try:
            if updates:
                await session.execute(update(CacheRow), updates)
            if inserts:
                result = await session.execute(insert(CacheRow).returning(CacheRow.id, CacheRow.name), inserts)
                ids.update({row.name: row.id for row in result})
        except IntegrityError as error:
            raise CacheConflictError(f"ImageCache ID used by another cache: {error.orig}") from error
        await self._replace_cache_images(session, {ids[c.name]: c.images for c in caches})

    async def _replace_cache_images(
        self, session: AsyncSession, images_by_cache: dict[int, tuple[CachedImage, ...]]
    ) -> None:
        for cache_ids in _chunks(list(images_by_cache)):
            await session.execute(delete(CacheImageRow).where(CacheImageRow.cache_id.in_(cache_ids)))
        rows = [
            {
                "cache_id": cache_id,
                "position": position,
                "reference": image.reference,
                "digest": image.digest,
                "size_bytes": image.size,
            }
            for cache_id, images in images_by_cache.items()
            for position, image in enumerate(images)
        ]
        if rows:
            await session.execute(insert(CacheImageRow), rows)

    async def _select_caches(
        self,
        session: AsyncSession,
        *where: ColumnElement[bool],
        order_by: Sequence[ColumnElement[Any]] = (),
        limit: int | None = None,
    ) -> tuple[ImageCache, ...]:
        conditions = list(where)
        if limit is not None:
            first = select(CacheRow.id).where(*where).order_by(*order_by, CacheRow.id).limit(limit)
            conditions.append(CacheRow.id.in_(first))
        # Two queries, not a join: a joined row per image would decode each cache's labels and
        # times once per image. Both run in one read transaction, hence see one snapshot.
        rows = (
            await session.execute(select(*_CACHE_COLUMNS).where(*conditions).order_by(*order_by, CacheRow.id))
        ).all()
        images: dict[int, list[CachedImage]] = {row.id: [] for row in rows}
        if rows:
            image_rows = await session.execute(
                select(
                    CacheImageRow.cache_id,
                    CacheImageRow.reference,
                    CacheImageRow.size_bytes,
                    CacheImageRow.digest,
                )
                .join(CacheRow, CacheRow.id == CacheImageRow.cache_id)
                .where(*conditions)
                .order_by(CacheImageRow.cache_id, CacheImageRow.position)
            )
            for cache_id, reference, size, digest in image_rows:
                images[cache_id].append(CachedImage(reference=reference, size=size, digest=digest))
        return tuple(_cache_from_row(row, images[row.id]) for row in rows)

    async def get_cache_by_id(self, imc_id: str) -> ImageCache | None:
        async with self._reading() as session:
            found = await self._select_caches(session, CacheRow.imc_id == imc_id)
        return found[0] if found else None

    async def get_cache_by_name(self, name: str) -> ImageCache | None:
        async with self._reading() as session:
            found = await self._select_caches(session, CacheRow.name == name)
        return found[0] if found else None

    async def list_caches(self) -> tuple[ImageCache, ...]:
        """Every cache, by name."""
        async with self._reading() as session:
            return await self._select_caches(session, order_by=(CacheRow.name.asc(),))

    async def list_match_candidates(self, now: datetime) -> tuple[ImageCache, ...]:
        """Ready caches not expired at ``now``: the automatic matching's candidates, newest first."""
        async with self._reading() as session:
            return await self._select_caches(
                session,
                CacheRow.phase == CachePhase.READY.value,
                (CacheRow.expires_at.is_(None)) | (CacheRow.expires_at > now),
                order_by=(CacheRow.created_at.desc(),),
            )

    async def list_expired(self, now: datetime) -> tuple[ImageCache, ...]:
        """Caches whose expiry time is at or before ``now``, the longest expired first."""
        async with self._reading() as session:
            return await self._select_caches(
                session,
                CacheRow.expires_at.is_not(None),
                CacheRow.expires_at <= now,
                order_by=(CacheRow.expires_at.asc(),),
            )

    async def list_least_recently_used(self, *, automatic: bool, limit: int | None = None) -> tuple[ImageCache, ...]:
        """Manual or automatic caches, least recently used first (never matched: by creation)."""
        last_used = func.coalesce(CacheRow.last_matched_at, CacheRow.created_at)
        async with self._reading() as session:
            return await self._select_caches(
                session,
                CacheRow.automatic == automatic,
                order_by=(last_used.asc(), CacheRow.created_at.asc()),
                limit=limit,
            )

    async def count_caches(self, *, automatic: bool | None = None) -> int:
        """How many caches there are (only manual or only automatic ones, if ``automatic`` is given)."""
        query = select(func.count()).select_from(CacheRow)
        if automatic is not None:
            query = query.where(CacheRow.automatic == automatic)
        async with self._reading() as session:
            return (await session.execute(query)).scalar_one()

    async def set_cache_status(
        self,
        name: str,
        *,
        now: datetime,
        phase: CachePhase | None = None,
        progress: int | None = None,
        message: str | None = None,
        expires_at: datetime | Unset | None = UNSET,
        images: tuple[CachedImage, ...] | None = None,
    ) -> ImageCache | None:
        """Change the given fields of the cache ``name``; None if there is no such cache."""
        changes: dict[str, Any] = {"updated_at": now}
        if phase is not None:
            changes["phase"] = phase.value
        if progress is not None:
            changes["progress"] = progress
        if message is not None:
            changes["message"] = message
        if not isinstance(expires_at, Unset):
            changes["expires_at"] = expires_at
        async with self._writing() as session:
            result = await session.execute(
                update(CacheRow)
                .where(CacheRow.name == name)
                .values(**changes)
                .returning(CacheRow.id)
                .execution_options(synchronize_session=False)
            )
            cache_id = result.scalar_one_or_none()
            if cache_id is None:
                return None
            if images is not None:
                await self._replace_cache_images(session, {cache_id: images})
            return (await self._select_caches(session, CacheRow.id == cache_id))[0]

    async def mark_cache_matched(
        self, imc_id: str, now: datetime, *, expires_at: datetime | Unset | None = UNSET, count: int = 1
    ) -> bool:
        """Record that ``count`` Pods were given this cache (the last at ``now``): last-matched time, hit count.

        ``expires_at``, if given, is set in the same transaction (automatic caches live 30 days
        after their last use). False if there is no such cache.
        """
        changes: dict[str, Any] = {"last_matched_at": now, "hit_count": CacheRow.hit_count + count}
        if not isinstance(expires_at, Unset):
            changes["expires_at"] = expires_at
        async with self._writing() as session:
            result = await session.execute(
                update(CacheRow)
                .where(CacheRow.imc_id == imc_id)
                .values(**changes)
                .returning(CacheRow.id)
                .execution_options(synchronize_session=False)
            )
            return result.scalar_one_or_none() is not None

    async def delete_cache(self, name: str) -> bool:
        """Forget the cache ``name`` with its images and events; Pod starts that used it remain."""
        async with self._writing() as session:
            result = await session.execute(
                delete(CacheRow)
                .where(CacheRow.name == name)
                .returning(CacheRow.id)
                .execution_options(synchronize_session=False)
            )
            return result.scalar_one_or_none() is not None

    async def append_cache_event(
        self, name: str, *, type: str, message: str, now: datetime
    ) -> tuple[CacheEvent, ...] | None:
        """Add an event to the cache ``name``; return its events (oldest first, at most 50).

        None if there is no such cache. See ``records.merge_cache_event`` for counting.
        """
        async with self._writing() as session:
            # FOR UPDATE: on PostgreSQL concurrent appends (several tasks, several agents) would
            # otherwise read the same events and lose counts; SQLite's BEGIN IMMEDIATE already
            # serialises writers (and SQLAlchemy leaves the clause out there).
            cache_id = (
                await session.execute(select(CacheRow.id).where(CacheRow.name == name).with_for_update())
            ).scalar_one_or_none()
            if cache_id is None:
                return None
            events = merge_cache_event(
                await self._select_events(session, cache_id), type=type, message=message, now=now
            )
            await session.execute(delete(CacheEventRow).where(CacheEventRow.cache_id == cache_id))
            await session.execute(
                insert(CacheEventRow),
                [
                    {
                        "cache_id": cache_id,
                        "type": event.type,
                        "message": event.message,
                        "count": event.count,
                        "first_timestamp": event.first_timestamp,
                        "last_timestamp": event.last_timestamp,
                    }
                    for event in events
                ],
            )
        return events

    async def list_cache_events(self, name: str) -> tuple[CacheEvent, ...] | None:
        """The cache's events, oldest first; None if there is no such cache."""
        async with self._reading() as session:
            cache_id = (await session.execute(select(CacheRow.id).where(CacheRow.name == name))).scalar_one_or_none()
            if cache_id is None:
                return None
            return await self._select_events(session, cache_id)

    async def _select_events(self, session: AsyncSession, cache_id: int) -> tuple[CacheEvent, ...]:
        result = await session.execute(
            select(
                CacheEventRow.type,
                CacheEventRow.message,
                CacheEventRow.count.label("event_count"),
                CacheEventRow.first_timestamp,
                CacheEventRow.last_timestamp,
            )
            .where(CacheEventRow.cache_id == cache_id)
            .order_by(CacheEventRow.id)
        )
        return tuple(
            CacheEvent(
                type=row.type,
                message=row.message,
                count=row.event_count,
                first_timestamp=row.first_timestamp,
                last_timestamp=row.last_timestamp,
            )
            for row in result
        )

    # ---- image manifests ----------------------------------------------------------------------

    async def save_manifest(
        self, manifest: ImageManifest, *, resolved_at: datetime | None = None, replace: bool = True
    ) -> None:
        """Store (or, with ``replace``, replace) the manifest of ``manifest.reference``.

        A layer is stored once by digest, however many images share it; its sizes are those
        first recorded (a digest names its content).
        """
        layers = {layer.digest: layer for layer in manifest.layers}
        image_values = {
            "digest": manifest.digest,
            "source": manifest.source,
            "size_bytes": manifest.size,
            "uncompressed_size_bytes": manifest.uncompressed_size,
            "resolved_at": resolved_at,
        }
        async with self._writing() as session:
            if not replace:
                stored = select(ImageRow.id).where(ImageRow.reference == manifest.reference)
                if (await session.execute(stored)).first() is not None:
                    return
            if layers:
                await session.execute(
                    self._insert(session, LayerRow).on_conflict_do_nothing(index_elements=["digest"]),
                    [
                        {
                            "digest": layer.digest,
                            "size_bytes": layer.size,
                            "uncompressed_size_bytes": layer.uncompressed_size,
                        }
                        # Digest order: two agents storing overlapping layers lock them in the
                        # same order, so PostgreSQL never sees a deadlock between them.
                        for layer in sorted(layers.values(), key=lambda layer: layer.digest)
                    ],
                )
            # One statement, not "update, else insert": agents sharing a PostgreSQL registry may
            # resolve the same image at once, and the loser of an insert race would fail.
            upsert = self._insert(session, ImageRow).values(reference=manifest.reference, **image_values)
            upsert = (
                upsert.on_conflict_do_update(index_elements=["reference"], set_=image_values)
                if replace
                else upsert.on_conflict_do_nothing(index_elements=["reference"])
            )
            image_id = (await session.execute(upsert.returning(ImageRow.id))).scalar_one_or_none()
            if image_id is None:  # already stored, and not to be replaced
                return
            await session.execute(delete(ImageLayerRow).where(ImageLayerRow.image_id == image_id))
            if manifest.layers:
                await session.execute(
                    insert(ImageLayerRow),
                    [
                        {"image_id": image_id, "position": position, "layer_digest": layer.digest}
                        for position, layer in enumerate(manifest.layers)
                    ],
                )

    async def get_manifest(self, reference: str) -> ImageManifest | None:
        return (await self.get_manifests([reference])).get(reference)

    async def get_manifests(self, references: Iterable[str]) -> dict[str, ImageManifest]:
        """The stored manifests among ``references``, by reference (absent ones are left out)."""
        wanted = list(dict.fromkeys(references))
        found: dict[str, ImageManifest] = {}
        async with self._reading() as session:
            for chunk in _chunks(wanted):
                result = await session.execute(
                    select(
                        ImageRow.id,
                        ImageRow.reference,
                        ImageRow.digest,
                        ImageRow.source,
                        LayerRow.digest.label("layer_digest"),
                        LayerRow.size_bytes,
                        LayerRow.uncompressed_size_bytes,
                    )
                    .outerjoin(ImageLayerRow, ImageLayerRow.image_id == ImageRow.id)
                    .outerjoin(LayerRow, LayerRow.digest == ImageLayerRow.layer_digest)
                    .where(ImageRow.reference.in_(chunk))
                    .order_by(ImageRow.id, ImageLayerRow.position)
                )
                layers: dict[str, list[Layer]] = {}
                heads: dict[str, Any] = {}
                for row in result:
                    heads.setdefault(row.reference, row)
                    image_layers = layers.setdefault(row.reference, [])
                    if row.layer_digest is not None:
                        image_layers.append(
                            Layer(
                                digest=row.layer_digest,
                                size=row.size_bytes,
                                uncompressed_size=row.uncompressed_size_bytes,
                            )
                        )
                for reference, head in heads.items():
                    found[reference] = ImageManifest(
                        reference=reference,
                        digest=head.digest,
                        layers=tuple(layers[reference]),
                        source=head.source,
                    )
        return found

    # ---- Pod starts ---------------------------------------------------------------------------

    async def record_pod_start(self, record: PodStartRecord) -> bool:
        """Store one Pod start; False (and nothing changed) if that Pod UID is already recorded."""
        return (await self.record_pod_starts([record]))[0]

    async def record_pod_starts(self, records: Sequence[PodStartRecord]) -> list[bool]:
        """Store several Pod starts in one transaction; for each, False if its Pod UID was already recorded.

        The one exception: a start replaces a ``failed`` record of the same Pod (a Pod is failed by
        its cache only once; if it starts after all, that is what happened to it).

        Two executemany statements per batch (INSERT .. ON CONFLICT DO NOTHING RETURNING for the
        starts, which SQLAlchemy sends as multi-row INSERTs from one cached compilation; then the
        images), so a burst of starts costs little CPU: about 40 microseconds per start here.
        """
        first: dict[str, PodStartRecord] = {}
        for record in records:
            first.setdefault(record.pod_uid, record)  # a repeat within the batch is "already recorded"
        new_ids: dict[str, int] = {}
        starts = PodStartRow.__table__
        started = [uid for uid, record in first.items() if record.outcome is not CacheOutcome.FAILED]
        async with self._writing() as session:
            if started:
                # A Pod recorded as failed by its cache that starts after all (an agent stopped before
                # the Failed status was written resolves it again on restart): the start replaces it.
                await session.execute(
                    delete(PodStartRow).where(
                        PodStartRow.pod_uid.in_(started), PodStartRow.cache_outcome == CacheOutcome.FAILED.value
                    )
                )
            if first:
                inserted = await session.execute(
                    self._insert(session, starts)
                    .on_conflict_do_nothing(index_elements=["pod_uid"])
                    .returning(starts.c.id, starts.c.pod_uid),
                    [_pod_start_values(record) for record in first.values()],
                )
                new_ids.update((uid, row_id) for row_id, uid in inserted.all())
            image_rows = [
                {
                    "pod_start_id": new_ids[record.pod_uid],
                    "position": position,
                    "reference": image.reference,
                    "bytes_pulled": image.bytes_pulled,
                    "pull_seconds": image.pull_seconds,
                    "from_cache": image.from_cache,
                }
                for record in first.values()
                if record.pod_uid in new_ids
                for position, image in enumerate(record.images)
            ]
            if image_rows:
                await session.execute(insert(PodStartImageRow), image_rows)
        stored = []
        for record in records:
            stored.append(first.get(record.pod_uid) is record and record.pod_uid in new_ids)
        return stored

    async def recorded_pod_uids(self, uids: Sequence[str]) -> set[str]:
        """Those of these Pod UIDs that have a start (or failed) record."""
        found: set[str] = set()
        async with self._reading() as session:
            for chunk in _chunks(list(dict.fromkeys(uids))):
                rows = await session.execute(select(PodStartRow.pod_uid).where(PodStartRow.pod_uid.in_(chunk)))
                found.update(rows.scalars())
        return found

    async def forget_pod_starts(self, uids: Sequence[str], *, labels: Mapping[str, str] | None = None) -> int:
        """Delete the Pod starts with these UIDs, and those whose labels include all of ``labels``
        (an earlier run of a simulation), with their images, in one transaction; their cache hits
        come off their caches' hit counts. Returns how many were deleted."""
        columns = (PodStartRow.id, PodStartRow.cache_outcome, PodStartRow.imc_id)
        async with self._writing() as session:
            found: dict[int, tuple[str, str | None]] = {}
            queries = [select(*columns).where(PodStartRow.pod_uid.in_(chunk)) for chunk in _chunks(list(uids))]
            if labels:
                queries.append(select(*columns).where(*_labelled(PodStartRow.labels, labels)))
            for query in queries:
                found.update((row.id, (row.cache_outcome, row.imc_id)) for row in await session.execute(query))
            for chunk in _chunks(list(found)):
                await session.execute(delete(PodStartImageRow).where(PodStartImageRow.pod_start_id.in_(chunk)))
                await session.execute(delete(PodStartRow).where(PodStartRow.id.in_(chunk)))
            counted = Counter(
                imc_id for outcome, imc_id in found.values() if CacheOutcome(outcome).used_cache and imc_id
            )
            for imc_id, count in counted.items():
                await session.execute(
                    update(CacheRow)
                    .where(CacheRow.imc_id == imc_id)
                    .values(hit_count=case((CacheRow.hit_count > count, CacheRow.hit_count - count), else_=0))
                    .execution_options(synchronize_session=False)
                )
        return len(found)

    async def pod_starts_by_label(self, imc_id: str, keys: Sequence[str]) -> dict[tuple[str | None, ...], int]:
        """How many recorded Pod starts used the cache ``imc_id``, by the values of their labels
        ``keys`` (None where a start has no such label: an agent's, say)."""
        values = [PodStartRow.labels[key].as_string().label(f"k{n}") for n, key in enumerate(keys)]
        query = select(*values, func.count()).where(PodStartRow.imc_id == imc_id).group_by(*values)
        async with self._reading() as session:
            return {tuple(row[:-1]): int(row[-1]) for row in await session.execute(query)}

    async def forget_unused_caches(self, labels: Mapping[str, str], *, keep: Iterable[str] = ()) -> list[str]:
        """Delete the automatic caches whose labels include all of ``labels`` (those an earlier run of
        a simulation made), except those named in ``keep`` and those a recorded Pod start used;
        returns their names."""
        wanted = _labelled(CacheRow.labels, labels)
        kept = set(keep)
        async with self._writing() as session:
            rows = (
                await session.execute(
                    select(CacheRow.id, CacheRow.name, CacheRow.imc_id).where(CacheRow.automatic, *wanted)
                )
            ).all()
            used = {
                imc_id
                for chunk in _chunks([row.imc_id for row in rows])
                for imc_id in (
                    await session.execute(select(PodStartRow.imc_id).where(PodStartRow.imc_id.in_(chunk)).distinct())
                ).scalars()
            }
            gone = [row for row in rows if row.name not in kept and row.imc_id not in used]
            for chunk in _chunks([row.id for row in gone]):
                await session.execute(delete(CacheRow).where(CacheRow.id.in_(chunk)))
        return sorted(row.name for row in gone)

    async def list_pod_starts(
        self,
        *,
        namespace: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> tuple[PodStartRecord, ...]:
        """Recorded Pod starts in order of ``started_at``; ``since`` inclusive, ``until`` exclusive.

        With ``limit``, the earliest ``limit`` of them.
        """
        conditions: list[ColumnElement[bool]] = []
        if namespace is not None:
            conditions.append(PodStartRow.namespace == namespace)
        if since is not None:
            conditions.append(PodStartRow.started_at >= since)
        if until is not None:
            conditions.append(PodStartRow.started_at < until)
        query = (
            select(
                *_POD_START_COLUMNS,
                PodStartImageRow.reference.label("image_reference"),
                PodStartImageRow.bytes_pulled.label("image_bytes_pulled"),
                PodStartImageRow.pull_seconds.label("image_pull_seconds"),
                PodStartImageRow.from_cache,
            )
            .outerjoin(PodStartImageRow, PodStartImageRow.pod_start_id == PodStartRow.id)
            .where(*conditions)
            .order_by(PodStartRow.started_at, PodStartRow.id, PodStartImageRow.position)
        )
        if limit is not None:
            first = (
                select(PodStartRow.id).where(*conditions).order_by(PodStartRow.started_at, PodStartRow.id).limit(limit)
            )
            query = query.where(PodStartRow.id.in_(first))
        async with self._reading() as session:
            return _pod_starts_from_rows(await session.execute(query))
