"""The ImageCache controller and the Pod side of image caches.

:class:`ImageCacheController` is the list+watch handler of ImageCache objects. It keeps the
registry in step with them (one row per object, same name), builds caches in simulation
(Preparing → Creating, progress with the bytes pulled, a snapshot step → Ready; or Failed),
applies image changes (Ready/UpdateFailed → Updating → Ready/UpdateFailed), enforces quotas and
deletes expired caches on a periodic sweep. It is the only writer of ImageCache ``status``, and
it holds every cache in memory (``caches``), in step with the registry, so that resolving a
Pod's cache never queries the database.

:class:`CacheManager` implements the pod controller's ``CacheResolver``: one pure
``domain.resolver.resolve`` per Pod over the in-memory caches, serialised with a lock so that a
cache it creates is seen by the next Pod (a burst of misses shares one automatic cache); then
it records hits and creates automatic caches as ImageCache objects.

Several agents may share the cluster's ImageCache objects, with one registry (PostgreSQL) or
each its own (SQLite). One of them leads (``controllers.leader``: it holds a Lease) and only the
leader acts on caches: it builds them, writes their status and their registry rows, deletes
expired ones and enforces quotas. Every agent, leader or follower, watches the objects and keeps
the in-memory index, so Pods on every agent resolve against every cache; a follower takes each
cache from the shared registry row (the leader writes the row before the status, so a status
change seen on the watch is already in the registry), or from the object's status when its
registry is its own, records its own hits there, and may create an automatic cache's object on a
miss (the leader builds it). When leadership moves, the new leader reloads the index from the
shared registry (with a registry of its own, it stores what it followed instead) and replays every
object as a resync does, which resumes unfinished builds.
Without ``leadership`` (``caches.leader_election: never``) the controller always leads.

Decisions live in ``domain.cachebuild`` and ``domain.resolver``; this module gathers facts and
applies what they decide. Time comes from the injected clock and ids from the injected random
generator. A restarted agent resumes: caches left in Preparing/Creating/Updating are built
again under the id they already have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from vk_provider.controllers.clock import Clock
from vk_provider.controllers.pods import CacheDecision, ImagePullError
from vk_provider.controllers.puller import CacheBuildResult, ProgressHandler
from vk_provider.domain import cachebuild as cb
from vk_provider.domain.annotations import INSTANCE_ID
from vk_provider.domain.cachebuild import CacheSpec, ChangeKind
from vk_provider.domain.events import EventSpec
from vk_provider.domain.images import InvalidReference
from vk_provider.domain.lifecycle import parse_time
from vk_provider.domain.model import CachedImage, CachePhase, ImageCache, ImageManifest
from vk_provider.domain.podspec import PodFacts
from vk_provider.domain.records import CacheEvent
from vk_provider.domain.resolver import AutoCreateSpec, Outcome, PodCacheFacts, Resolution, resolve, resume

log = logging.getLogger(__name__)
JSON = dict[str, Any]

# A cache this controller created is protected from a relist that does not show it yet.
_PENDING_SECONDS = 60.0
_STATUS_RETRIES = 5
# A build's progress is written at most this often (real seconds): with many builds at a high
# time scale, a write per percent each would be hundreds of writes a second.
PROGRESS_INTERVAL = 1.0
# How far an object's status.expireDateTime may lag the expiry that hits moved, before it is written.
EXPIRY_SLACK = timedelta(minutes=1)


# ------------------------------------------------------------------ seams


class CacheStore(Protocol):
    """The registry's cache methods (``registry.repository.Registry``)."""

    async def list_caches(self) -> tuple[ImageCache, ...]: ...

    async def get_cache_by_name(self, name: str) -> ImageCache | None: ...

    async def upsert_cache(self, cache: ImageCache, *, now: datetime) -> ImageCache:
        """Create or update the row named ``cache.name``; raises ValueError on an id used by another."""
        ...

    async def set_cache_status(
        self,
        name: str,
        *,
        now: datetime,
        phase: CachePhase | None = ...,
        progress: int | None = ...,
        message: str | None = ...,
        expires_at: datetime | None = ...,
        images: tuple[CachedImage, ...] | None = ...,
    ) -> ImageCache | None:
        """Change the given fields (an omitted ``expires_at`` is unchanged); None: no such row."""
        ...

    async def append_cache_event(
        self, name: str, *, type: str, message: str, now: datetime
    ) -> tuple[CacheEvent, ...] | None: ...

    async def list_cache_events(self, name: str) -> tuple[CacheEvent, ...] | None: ...

    async def mark_cache_matched(
        self, imc_id: str, now: datetime, *, expires_at: datetime | None = ..., count: int = ...
    ) -> bool: ...

    async def delete_cache(self, name: str) -> bool: ...


class ImageCacheApi(Protocol):
    """ImageCache objects on the API server (``kube.imagecaches.ImageCacheClient``)."""

    async def create(self, body: JSON) -> JSON:
        """Raises ``KubeError`` (409 AlreadyExists when the name is taken)."""
        ...

    async def patch_status(self, name: str, status: JSON) -> JSON:
        """Merge patch on the status subresource; raises ``KubeError`` (404: the object is gone)."""
        ...

    async def delete(self, name: str) -> None:
        """An object already gone is not an error."""
        ...


class ManifestSource(Protocol):
    """Image manifests (``controllers.images.CatalogImages``)."""

    def manifest(self, image: str) -> ImageManifest | InvalidReference | None:
        """The image's manifest if known now (catalog, synthetic, or already read); must not block."""
        ...

    async def resolve(
        self, image: str, *, namespace: str = "", pull_secrets: Sequence[str] = ()
    ) -> ImageManifest | InvalidReference | ImagePullError:
        """The image's manifest, reading it from its registry (with the given pull secrets of
        ``namespace``) where the settings say so."""
        ...


class CacheBuilder(Protocol):
    async def pull_for_cache(
        self,
        manifests: Sequence[ImageManifest],
        on_progress: ProgressHandler | None = None,
        *,
        skip_layers: Iterable[str] = (),
    ) -> CacheBuildResult: ...


@dataclass(frozen=True, slots=True)
class CacheOptions:
    """Knobs of the controller (from the ``caches`` settings group)."""

    manual_quota: int = 100
    automatic_quota: int = 100
    lru_for_manual: bool = False
    sweep_interval_seconds: float = 60.0
    snapshot_seconds: float = 5.0  # simulated seconds of the snapshot step of a build
    time_scale: float = 1.0
    # The registry is shared with the other agents (PostgreSQL): a follower reads the leader's rows.
    # Not shared (a SQLite file of its own): a follower's rows are its own, stale once another agent
    # leads, so it follows the objects' status.
    shared_registry: bool = True


class Leadership(Protocol):
    """Who acts on caches (``controllers.leader.LeaderElector``).

    The controller reads ``is_leader`` once, when it is made, and then follows ``on_change``,
    which it sets to its own :meth:`ImageCacheController.leadership_changed`.
    """

    @property
    def is_leader(self) -> bool: ...

    on_change: Callable[[bool], Awaitable[None]] | None


class _Gone(Exception):
    """The cache's object or row disappeared while it was being worked on."""


class _NotLeader(_Gone):
    """Leadership was lost while a cache was being worked on; the next leader carries on."""


# ------------------------------------------------------------------ the controller


class ImageCacheController:
    """Implements ``kube.watching.WatchHandler`` for ImageCache objects; see the module docstring."""

    def __init__(
        self,
        *,
        api: ImageCacheApi,
        store: CacheStore,
        manifests: ManifestSource,
        builder: CacheBuilder,
        clock: Clock,
        rng: random.Random,
        options: CacheOptions = CacheOptions(),
        leadership: Leadership | None = None,
    ) -> None:
        self.api = api
        self.store = store
        self.manifests = manifests
        self.builder = builder
        self.clock = clock
        self.rng = rng
        self.options = options
        self.caches: dict[str, ImageCache] = {}
        self.synced = asyncio.Event()
        self._loaded = False
        self._builds: dict[str, asyncio.Task[None]] = {}
        self._building_images: dict[str, tuple[str, ...]] = {}  # what each build makes (while building)
        self._specs: dict[str, CacheSpec] = {}
        self._statuses: dict[str, JSON] = {}
        self._events: dict[str, tuple[CacheEvent, ...]] = {}
        self._start_times: dict[str, datetime] = {}
        self._refused: dict[str, tuple[tuple[str, ...], str]] = {}
        self._pending: dict[str, float] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._objects: dict[str, JSON] = {}
        # Object events and leadership changes are applied one at a time, so that a takeover's
        # replay never interleaves with an event's handling.
        self._lock = asyncio.Lock()
        self._elected = leadership is not None
        self._leading = leadership is None or leadership.is_leader
        if leadership is not None:
            leadership.on_change = self.leadership_changed
        self.builds_finished = 0
        # The cluster's CRD keeps ``status.images`` (False once a write comes back without them:
        # a CRD installed by an older vk-provider prunes the field).
        self.status_images = True

    @property
    def leading(self) -> bool:
        """Whether this agent acts on caches now (always, without an election)."""
        return self._leading

    # -- queries

    def by_id(self, imc_id: str) -> ImageCache | None:
        """The cache with this id (a scan: for tests and tools, not for per-Pod work)."""
        return next((c for c in self.caches.values() if c.imc_id == imc_id), None)

    def building(self, name: str) -> bool:
        task = self._builds.get(name)
        return task is not None and not task.done()

    # -- watch handler

    async def resync(self, objects: list[JSON]) -> None:
        async with self._lock:
            await self._resync(objects)

    async def _resync(self, objects: list[JSON]) -> None:
        if not self._loaded:
            self.caches = {cache.name: cache for cache in await self.store.list_caches()}
            self._loaded = True
            log.info("image caches: %d in the registry", len(self.caches))
        seen: set[str] = set()
        for obj in objects:
            name = (obj.get("metadata") or {}).get("name")
            if name:
                seen.add(name)
                await self._upsert(obj)
        await self._forget_orphans(seen)
        self.synced.set()

    async def _forget_orphans(self, objects: Collection[str]) -> None:
        """Forget the caches whose objects are gone (not among ``objects``), but for those this
        agent created a moment ago (the watch may not have brought their objects yet)."""
        now = self.clock.monotonic()
        for name in [n for n in self.caches if n not in objects]:
            if now - self._pending.get(name, -_PENDING_SECONDS) < _PENDING_SECONDS:
                continue
            log.info("image cache %s: its object is gone; forgetting it", name)
            await self._forget(name)

    async def upsert(self, obj: JSON) -> None:
        async with self._lock:
            await self._upsert(obj)

    async def _upsert(self, obj: JSON) -> None:
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not name or meta.get("deletionTimestamp"):
            return
        self._objects[name] = obj
        try:
            await self._apply(name, meta, obj)
        except _Gone:
            pass
        except Exception:  # e.g. the database is locked: the next event or relist tries again
            log.exception("image cache %s: could not apply the object", name)

    async def _apply(self, name: str, meta: JSON, obj: JSON) -> None:
        spec = cb.parse_spec(obj.get("spec"), meta.get("labels"), meta.get("annotations"))
        status = obj.get("status") or {}
        self._pending.pop(name, None)
        self._specs[name] = spec
        self._statuses[name] = status
        started = parse_time(status.get("startTime"))
        if started is not None:
            self._start_times.setdefault(name, started)
        if not self._leading:
            await self._follow(name, meta, spec, status)
            return
        current = self.caches.get(name)
        if current is None:
            current = await self._create(name, spec, status, parse_time(meta.get("creationTimestamp")))
            if current is None:
                return
        if name not in self._refused and str(status.get("message") or "").startswith(cb.REFUSAL_PREFIX):
            # Restarted agent: a refusal written before is still in force.
            self._refused[name] = (spec.references, str(status["message"]))
        refused = self._refused.get(name)
        change = cb.plan_change(
            current,
            spec,
            building=self.building(name),
            refused=refused[0] if refused else None,
            building_images=self._building_images.get(name),
        )
        if change.refused:
            if refused is None or refused[0] != spec.references:
                self._refused[name] = (spec.references, cb.refusal_message(current.phase))
                log.info("image cache %s: %s", name, self._refused[name][1])
        else:
            self._refused.pop(name, None)
        if change.kind is ChangeKind.RESUME:
            images = tuple(image.reference for image in current.images)
            build_spec = spec if not change.refused else replace(spec, images=images, problems=())
            self._start_build(name, build_spec, update=current.phase is CachePhase.UPDATING)
        elif change.kind is ChangeKind.UPDATE:
            self._start_build(name, spec, update=True)
        elif not self.building(name):
            current = await self._apply_settings(name, current, spec)
            current = await self._take_followers_expiry(current, status)
            if self._status_differs(status, current, self._message(name)):
                await self._write_status(name, with_events=True)

    async def _apply_settings(self, name: str, current: ImageCache, spec: CacheSpec) -> ImageCache:
        """A changed ``imageCacheSize`` or ``retentionDays`` of a cache not being built goes to its
        row (and, through the expiry, to its status). Retention counts from the cache's creation;
        an automatic cache's expiry follows its use, and a failed one's its failure, so those keep it."""
        changes: dict[str, Any] = {}
        if spec.size_gib != current.size_gib:
            changes["size_gib"] = spec.size_gib
        if not current.automatic and current.phase in (CachePhase.READY, CachePhase.UPDATE_FAILED):
            expires = cb.expiry_when_created(current.created_at, spec)
            if expires != current.expires_at:
                changes["expires_at"] = expires
        if not changes:
            return current
        changed = replace(current, **changes)
        await self.store.upsert_cache(changed, now=self.clock.now())
        self.caches[name] = changed
        log.info("image cache %s: %s changed", name, " and ".join(sorted(changes)))
        return changed

    async def delete(self, obj: JSON) -> None:
        name = (obj.get("metadata") or {}).get("name")
        if not name:
            return
        async with self._lock:
            self._objects.pop(name, None)
            if name in self.caches:
                log.info("image cache %s: deleted", name)
                await self._forget(name)

    # -- leadership

    async def leadership_changed(self, leading: bool) -> None:
        """Start or stop acting on caches (the elector's ``on_change``).

        Stepping down stops every build at once (the next leader resumes them). Taking over
        reloads the index from the shared registry, where the previous leader wrote, and replays
        every object known as a resync would: unfinished builds resume, objects created while
        there was no leader are built.
        """
        async with self._lock:
            if leading == self._leading:
                return
            self._leading = leading
            if not leading:
                log.info("image caches: no longer the leader; builds stop, another agent carries them on")
                builds = [task for task in self._builds.values() if not task.done()]
                self._builds.clear()
                for task in builds:
                    task.cancel()
                await asyncio.gather(*builds, return_exceptions=True)
                return
            log.info("image caches: now the leader; resuming what is unfinished")
            if not self._loaded:
                return  # the first resync acts as the leader
            if self.options.shared_registry:  # the previous leader wrote the rows: they are current
                stored = {cache.name: cache for cache in await self.store.list_caches()}
                pending = {n: c for n, c in self.caches.items() if n in self._pending and n not in stored}
                self.caches = {name: self._with_known_match(cache) for name, cache in stored.items()} | pending
            else:
                # A registry of its own is stale if another agent led meanwhile; what this agent
                # followed from the objects' status is current: its rows catch up (or a cache that
                # agent finished would be built again), and rows with no object are forgotten below.
                now = self.clock.now()
                for cache in list(self.caches.values()):
                    try:
                        self.caches[cache.name] = await self.store.upsert_cache(cache, now=now)
                    except Exception as exc:  # e.g. its id is another row's: the replay decides
                        log.warning("image cache %s: could not store what was followed: %s", cache.name, exc)
                for row in await self.store.list_caches():
                    self.caches.setdefault(row.name, row)
            for obj in list(self._objects.values()):
                await self._upsert(obj)
            # Rows of caches deleted while another agent led (or while nobody did: after a kill).
            await self._forget_orphans(set(self._objects))

    def _with_known_match(self, stored: ImageCache) -> ImageCache:
        """``stored``, with a hit noted in memory whose registry write has not landed yet."""
        known = self.caches.get(stored.name)
        if (
            known is not None
            and known.last_matched_at is not None
            and (stored.last_matched_at is None or stored.last_matched_at < known.last_matched_at)
        ):
            return replace(stored, last_matched_at=known.last_matched_at, expires_at=known.expires_at)
        return stored

    async def _follow(self, name: str, meta: JSON, spec: CacheSpec, status: JSON) -> None:
        """A follower's index entry: the shared registry's row (the leader wrote it), else the
        object's status (a registry of its own), else what this agent reserved on a miss."""
        current = self.caches.get(name)
        held = cb.status_images(status)
        # The status agrees: nothing to do, unless, with a registry of its own, the entry holds
        # images another leader has changed since (a status from an older agent does not list them).
        if (
            current is not None
            and not cb.status_differs(status, current, current.message, images=held is not None)
            and (self.options.shared_registry or held is not None or cb.images_match(current, spec))
        ):
            return
        row = await self.store.get_cache_by_name(name) if self.options.shared_registry else None
        status_id = str(status.get("imageCacheId") or "")
        if row is not None and status_id in ("", row.imc_id):
            self._follow_to(row, current)
            return
        phase_text = str(status.get("phase") or "")
        if cb.is_imc_id(status_id) and phase_text in {phase.value for phase in CachePhase}:
            created = parse_time(meta.get("creationTimestamp")) or self.clock.now()
            self._follow_to(
                ImageCache(
                    imc_id=status_id,
                    name=name,
                    phase=CachePhase(phase_text),
                    size_gib=spec.size_gib,
                    # What the builder says it holds: the spec may have been edited since (while
                    # nobody led, or refused while it was Creating).
                    images=self._images_held(held, spec),
                    automatic=spec.automatic,
                    created_at=created,
                    progress=cb.parse_progress(status.get("progress")),
                    expires_at=parse_time(status.get("expireDateTime")),
                    message=str(status.get("message") or ""),
                ),
                current,
            )

    def _follow_to(self, cache: ImageCache, before: ImageCache | None) -> None:
        cache = self._with_known_match(cache)
        self.caches[cache.name] = cache
        if before is None or before.phase is not cache.phase:
            log.info("image cache %s (%s): %s, as the leader reports", cache.name, cache.imc_id, cache.phase.value)

    async def _refresh_matches(self) -> None:
        """Take hits that other agents recorded in the shared registry into the index (their
        expiry and LRU order), before the leader deletes or evicts anything."""
        for stored in await self.store.list_caches():
            known = self.caches.get(stored.name)
            if (
                known is not None
                and stored.last_matched_at is not None
                and (known.last_matched_at is None or known.last_matched_at < stored.last_matched_at)
            ):
                self.caches[stored.name] = replace(
                    known, last_matched_at=stored.last_matched_at, expires_at=stored.expires_at
                )

    # -- running

    async def run(self) -> None:
        """Delete expired caches every ``sweep_interval_seconds``; on cancellation stop every build."""
        try:
            while True:
                await self.synced.wait()
                try:
                    if self._leading:
                        if self._elected:
                            await self._refresh_matches()
                        await self.sweep()
                except Exception:  # the next sweep tries again; the agent must not stop for it
                    log.exception("image caches: the expiry sweep failed")
                await self.clock.sleep(self.options.sweep_interval_seconds)
        finally:
            tasks = [*self._builds.values(), *self._background]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def sweep(self) -> int:
        """Delete the caches expired now (object and row); returns how many."""
        doomed = cb.expired(self.caches.values(), self.clock.now())
        for cache in doomed:
            log.info("image cache %s (%s): expired at %s; deleting it", cache.name, cache.imc_id, cache.expires_at)
            await self.remove(cache.name)
        return len(doomed)

    async def remove(self, name: str) -> None:
        """Delete a cache for good: its build, its object and its row."""
        await self._forget(name)
        try:
            await self.api.delete(name)
        except Exception as exc:
            log.warning("image cache %s: could not delete the object: %s", name, exc)

    # -- for the CacheManager (synchronous: called under its lock)

    def reserve_automatic(
        self, auto: AutoCreateSpec, images: tuple[CachedImage, ...], now: datetime
    ) -> tuple[ImageCache | None, tuple[ImageCache, ...], str]:
        """Put a new automatic cache in the index (Preparing) and take its LRU victims out.

        Returns (the cache, or None when the quota refuses it; the evicted caches; the refusal).
        The caller then calls :meth:`create_automatic`.
        """
        if auto.name in self.caches:
            return self.caches[auto.name], (), ""
        # A follower only creates the object: the leader applies the quota when it sees it.
        quota = (
            cb.quota_decision(self.caches.values(), automatic=True, quota=self.options.automatic_quota, lru=True)
            if self._leading
            else cb.QuotaDecision()
        )
        if quota.refusal:
            return None, (), quota.refusal
        for victim in quota.evict:
            self.caches.pop(victim.name, None)
        cache = ImageCache(
            imc_id=auto.imc_id,
            name=auto.name,
            phase=CachePhase.PREPARING,
            size_gib=auto.size_gib,
            images=images,
            automatic=True,
            created_at=now,
            expires_at=now + cb.AUTO_UNUSED_RETENTION,
        )
        self.caches[auto.name] = cache
        self._pending[auto.name] = self.clock.monotonic()
        return cache, quota.evict, ""

    async def create_automatic(
        self, cache: ImageCache, evicted: Sequence[ImageCache], created_for: str, now: datetime
    ) -> str:
        """Evict, then store the reserved cache and create its object (its build starts when
        the watch delivers it). Returns why it could not be created, or "" when it was."""
        for victim in evicted:
            log.info("image cache %s: evicted (least recently used automatic cache)", victim.name)
            self.caches[victim.name] = victim  # so that remove() forgets it completely
            await self.remove(victim.name)
        try:
            if self._leading:  # a follower's row is written by the leader, from the object
                await self.store.upsert_cache(cache, now=now)
            await self.api.create(
                cb.auto_cache_body(
                    cache.name, cache.imc_id, [i.reference for i in cache.images], cache.size_gib, created_for
                )
            )
        except Exception as exc:
            if getattr(exc, "is_already_exists", False):
                return ""
            log.warning("image cache %s: could not create the automatic cache: %s", cache.name, exc)
            await self._forget(cache.name)
            return f"creating its object failed: {exc}"
        return ""

    def note_matched(self, cache: ImageCache, now: datetime) -> datetime | None:
        """Record a hit in the index; returns the cache's new expiry."""
        expires = cb.expiry_when_matched(cache, now)
        current = self.caches.get(cache.name, cache)
        self.caches[cache.name] = replace(current, last_matched_at=now, expires_at=expires)
        return expires

    async def show_expiry(self, name: str) -> None:
        """Hits moved the cache's expiry (an automatic cache's): write it to the object's status
        when the expiry it shows is more than ``EXPIRY_SLACK`` off, so a burst of hits is not a
        status write each.

        A follower with a registry of its own writes only the expiry, and only a later one: that is
        how its hits reach the leader, whose registry is another (the leader takes it, see
        :meth:`_take_followers_expiry`). With a shared registry the leader reads the hits from it.
        """
        cache = self.caches.get(name)
        if cache is None or cache.expires_at is None:
            return
        if not self._leading and self.options.shared_registry:
            return
        try:
            shown = parse_time((self._statuses.get(name) or {}).get("expireDateTime"))
        except ValueError:  # not a time we read (edited by hand): write ours
            shown = None
        if shown is not None and shown.tzinfo is not None and abs(cache.expires_at - shown) <= EXPIRY_SLACK:
            return
        if self._leading:
            with contextlib.suppress(_Gone):
                await self._write_status(name, with_events=False)
        elif shown is None or shown.tzinfo is None or cache.expires_at > shown:
            await self._show_followers_expiry(name, cache.expires_at)

    async def _show_followers_expiry(self, name: str, expires: datetime) -> None:
        try:
            written = await self.api.patch_status(name, {"expireDateTime": cb.rfc3339(expires)})
        except Exception as exc:  # the next hit tries again
            log.warning("image cache %s: could not show the expiry this agent's hits moved: %s", name, exc)
            return
        self._statuses[name] = written.get("status") or {
            **self._statuses.get(name, {}),
            "expireDateTime": cb.rfc3339(expires),
        }

    async def _take_followers_expiry(self, current: ImageCache, status: JSON) -> ImageCache:
        """An automatic cache whose object shows a later expiry than this leader's row: a follower
        with a registry of its own matched it (see :meth:`show_expiry`). Its last match is then
        30 days before that expiry; the row takes both, so the sweep and quotas count the hit.
        An expiry further out than a hit made now could set (edited by hand) is not taken."""
        if self.options.shared_registry or not current.automatic:
            return current
        try:
            shown = parse_time(status.get("expireDateTime"))
        except ValueError:
            return current
        now = self.clock.now()
        if (
            shown is None
            or shown.tzinfo is None
            or (current.expires_at is not None and shown <= current.expires_at)
            or shown > now + cb.AUTO_USED_RETENTION + EXPIRY_SLACK  # the furthest a hit made now sets
        ):
            return current
        matched = shown - cb.AUTO_USED_RETENTION
        if current.last_matched_at is not None and matched < current.last_matched_at:
            matched = current.last_matched_at
        await self.store.mark_cache_matched(current.imc_id, matched, expires_at=shown, count=0)
        taken = replace(current, last_matched_at=matched, expires_at=shown)
        self.caches[current.name] = taken
        log.info("image cache %s: another agent's hits moved its expiry to %s", current.name, cb.rfc3339(shown))
        return taken

    # -- internals: object → cache

    async def _create(self, name: str, spec: CacheSpec, status: JSON, created: datetime | None) -> ImageCache | None:
        """A row for an object this agent has none for. An object another leader finished (Ready,
        Failed, UpdateFailed), or was building when it stopped (its status lists the images it
        was making), is adopted as it is, holding the images its status lists, and returned: the
        caller then weighs its spec against it as against any cache (a build is resumed, an edit
        made meanwhile refused as it would have been). Otherwise a new cache is built (or refused
        by the quota): None."""
        now = self.clock.now()
        imc_id = str(status.get("imageCacheId") or "")
        has_id = cb.is_imc_id(imc_id)
        if not has_id:
            imc_id = spec.requested_id or cb.new_imc_id(self.rng)
        # An id already used by another cache is caught by the registry (ValueError) below.
        phase_text = str(status.get("phase") or "")
        held = cb.status_images(status)
        finished = phase_text in (CachePhase.READY, CachePhase.FAILED, CachePhase.UPDATE_FAILED)
        building = phase_text in (CachePhase.PREPARING, CachePhase.CREATING, CachePhase.UPDATING)
        adopted = finished or (building and held is not None and has_id)
        cache = ImageCache(
            imc_id=imc_id,
            name=name,
            phase=CachePhase(phase_text) if adopted else CachePhase.PREPARING,
            size_gib=spec.size_gib,
            images=self._images_held(held if adopted else None, spec),
            automatic=spec.automatic,
            created_at=created or now,
            progress=cb.parse_progress(status.get("progress")) if adopted else 0,
            expires_at=(
                parse_time(status.get("expireDateTime")) if adopted else cb.expiry_when_created(created or now, spec)
            ),
            message=str(status.get("message") or "") if adopted else "",
        )
        refusal = ""
        if not adopted:
            quota = cb.quota_decision(
                self.caches.values(),
                automatic=spec.automatic,
                quota=self.options.automatic_quota if spec.automatic else self.options.manual_quota,
                lru=spec.automatic or self.options.lru_for_manual,
            )
            for victim in quota.evict:
                log.info("image cache %s: evicted to make room for %s (quota, LRU)", victim.name, name)
                await self.remove(victim.name)
            refusal = quota.refusal
            if refusal:
                cache = replace(cache, phase=CachePhase.FAILED, message=refusal, expires_at=cb.expiry_when_failed(now))
        self.caches[name] = cache
        try:
            self.caches[name] = await self.store.upsert_cache(cache, now=now)
        except ValueError:  # the id belongs to another row (a copied object): take a new one
            cache = replace(cache, imc_id=cb.new_imc_id(self.rng))
            self.caches[name] = await self.store.upsert_cache(cache, now=now)
        if adopted:
            log.info("image cache %s: adopted as %s (%s)", name, cache.imc_id, cache.phase)
            return self.caches[name]
        if refusal:
            log.warning("image cache %s: %s", name, refusal)
            await self._update(name, event=("Warning", refusal))
        else:
            self._start_build(name, spec, update=False)
        return None

    def _images_held(self, held: tuple[str, ...] | None, spec: CacheSpec) -> tuple[CachedImage, ...]:
        """What a cache another leader built holds: the images its status lists (``held``), else
        (a status from an older agent) its spec's."""
        if held is None:
            return self._cached_images(spec.images, spec.references)
        return self._cached_images(held, held)

    def _cached_images(self, images: Sequence[str], references: Sequence[str]) -> tuple[CachedImage, ...]:
        """The images (with their normalised ``references``) the cache holds, each once
        (``nginx`` and ``docker.io/library/nginx`` are one)."""
        out: dict[str, CachedImage] = {}
        for image, reference in zip(images, references, strict=True):
            found = self.manifests.manifest(image)
            if isinstance(found, ImageManifest):
                out.setdefault(found.reference, CachedImage(found.reference, found.size, found.digest))
            else:
                out.setdefault(reference, CachedImage(reference, 0))
        return tuple(out.values())

    async def _forget(self, name: str) -> None:
        self._building_images.pop(name, None)
        task = self._builds.pop(name, None)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.caches.pop(name, None)
        tables: tuple[dict[str, Any], ...] = (
            self._specs,
            self._statuses,
            self._events,
            self._start_times,
            self._refused,
            self._pending,
            self._objects,
        )
        for table in tables:
            table.pop(name, None)
        if not self._leading:
            return  # the shared row is the leader's to delete
        try:
            await self.store.delete_cache(name)
        except Exception as exc:
            log.warning("image cache %s: could not delete its registry row: %s", name, exc)

    # -- internals: building

    def _start_build(self, name: str, spec: CacheSpec, *, update: bool) -> None:
        if self.building(name) or not self._leading:
            return
        task = asyncio.create_task(self._build(name, spec, update), name=f"imagecache-build:{name}")
        self._builds[name] = task
        self._building_images[name] = spec.references

    async def _build(self, name: str, spec: CacheSpec, update: bool) -> None:
        try:
            await self._build_steps(name, spec, update)
        except _NotLeader:
            log.info("image cache %s: no longer the leader; the build is left to the next one", name)
        except _Gone:
            log.info("image cache %s: gone during its build", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("image cache %s: build failed unexpectedly", name)
        finally:
            self.builds_finished += 1

    async def _build_steps(self, name: str, spec: CacheSpec, update: bool) -> None:
        before = self.caches[name]
        verb = "update" if update else "create"
        self._start_times.setdefault(name, self.clock.now())
        await self._update(
            name,
            phase=CachePhase.UPDATING if update else CachePhase.PREPARING,
            progress=0,
            message="",
            # From now on the images it will hold (its status says so: a leader taking over
            # resumes this build, not the one before); if the update fails it holds its old ones.
            images=self._cached_images(spec.images, spec.references),
            event=("Normal", f"Start to {verb} image cache {before.imc_id}"),
        )
        resolved = {image: await self._resolve(image, spec.pull_secrets) for image in spec.images}
        check = cb.check_build(spec, resolved, spec.size_gib)
        if check.failure:
            await self._fail(name, check.failure, before if update else None)
            return
        await self._update(
            name,
            phase=CachePhase.UPDATING if update else CachePhase.CREATING,
            images=tuple(CachedImage(m.reference, m.size, m.digest) for m in check.manifests),
            event=("Normal", "Successfully check image cache resource."),
        )
        fetched: set[str] = self._layers_held_elsewhere(name) if spec.reuse else set()
        done_before = 0
        shown, shown_at = 0, -PROGRESS_INTERVAL
        for manifest in check.manifests:
            # One image at a time, so that each image pulled is one event, as in ECI's example.
            async def progressed(done: int, total: int, base: int = done_before) -> None:
                nonlocal shown, shown_at
                percent = cb.build_progress(base + done, check.total_bytes)
                if percent != shown and self.clock.monotonic() - shown_at >= PROGRESS_INTERVAL:
                    shown, shown_at = percent, self.clock.monotonic()
                    await self._update(name, progress=percent)

            result = await self.builder.pull_for_cache([manifest], progressed, skip_layers=frozenset(fetched))
            fetched.update(layer.digest for layer in manifest.layers)
            done_before += result.total_bytes
            await self._update(
                name, event=("Normal", f"Successfully pulled image {manifest.reference} in {result.seconds:.1f}s")
            )
        await self._update(
            name, progress=cb.PULL_SHARE, event=("Normal", "Start to create the snapshot of the image cache")
        )
        if not spec.flash:  # flash: usable at once, the snapshot completes behind it
            await self.clock.sleep(self.options.snapshot_seconds / self.options.time_scale)
        cache = self.caches[name]
        expires = cache.expires_at
        if not update:
            expires = cb.expiry_when_created(cache.created_at, spec)
            if cache.automatic and cache.last_matched_at is not None:
                expires = cb.expiry_when_matched(cache, cache.last_matched_at)
        await self._update(
            name,
            phase=CachePhase.READY,
            progress=100,
            message="",
            expires_at=expires,
            event=("Normal", f"Successfully {verb}d image cache {cache.imc_id}"),
        )
        log.info("image cache %s (%s): Ready", name, cache.imc_id)

    def _layers_held_elsewhere(self, name: str) -> set[str]:
        """Layer digests of the images in the other Ready caches (imc-enable-reuse)."""
        held: set[str] = set()
        for other in self.caches.values():
            if other.name == name or not other.is_ready():
                continue
            for image in other.images:
                found = self.manifests.manifest(image.reference)
                if isinstance(found, ImageManifest):
                    held.update(layer.digest for layer in found.layers)
        return held

    async def _resolve(self, image: str, pull_secrets: Sequence[str]) -> ImageManifest | InvalidReference | str:
        """The image's manifest, or why it cannot be had; ``pull_secrets`` are ``namespace:name``."""
        by_namespace: dict[str, list[str]] = {}
        for secret in pull_secrets:
            namespace, _, secret_name = secret.partition(":")
            by_namespace.setdefault(namespace, []).append(secret_name)
        why = "no such image"
        for namespace, names in by_namespace.items() or [("", [])]:
            found = await self.manifests.resolve(image, namespace=namespace, pull_secrets=names)
            if not isinstance(found, ImagePullError):
                return found
            why = found.message
        return why

    async def _fail(self, name: str, why: str, before: ImageCache | None) -> None:
        log.warning("image cache %s: %s", name, why)
        if before is None:
            await self._update(
                name,
                phase=CachePhase.FAILED,
                message=why,
                expires_at=cb.expiry_when_failed(self.clock.now()),
                event=("Warning", f"Failed to create image cache: {why}"),
            )
        else:  # the cache still holds its previous images
            await self._update(
                name,
                phase=CachePhase.UPDATE_FAILED,
                progress=before.progress,
                message=why,
                images=before.images,
                event=("Warning", f"Failed to update image cache: {why}"),
            )

    # -- internals: writing

    def _status_differs(self, status: JSON, cache: ImageCache, message: str) -> bool:
        return cb.status_differs(status, cache, message, images=self.status_images)

    def _message(self, name: str) -> str:
        refused = self._refused.get(name)
        if refused is not None:
            return refused[1]
        cache = self.caches.get(name)
        return cache.message if cache is not None else ""

    async def _update(
        self,
        name: str,
        *,
        phase: CachePhase | None = None,
        progress: int | None = None,
        message: str | None = None,
        expires_at: datetime | cb.Keep | None = cb.KEEP,
        images: tuple[CachedImage, ...] | None = None,
        event: tuple[str, str] | None = None,
    ) -> None:
        """Write a change to the registry, then the object's status (its only writer)."""
        if not self._leading:
            raise _NotLeader
        if name not in self.caches:
            raise _Gone
        now = self.clock.now()
        if event is not None:
            events = await self.store.append_cache_event(name, type=event[0], message=event[1], now=now)
            if events is None:
                raise _Gone
            self._events[name] = events
        extra: dict[str, Any] = {} if isinstance(expires_at, cb.Keep) else {"expires_at": expires_at}
        stored = await self.store.set_cache_status(
            name, now=now, phase=phase, progress=progress, message=message, images=images, **extra
        )
        if stored is None or name not in self.caches:
            raise _Gone
        known = self.caches[name]
        if known.last_matched_at is not None and (
            stored.last_matched_at is None or stored.last_matched_at < known.last_matched_at
        ):
            # A hit noted in memory whose registry write has not landed yet.
            stored = replace(stored, last_matched_at=known.last_matched_at, expires_at=known.expires_at)
        self.caches[name] = stored
        await self._write_status(name, with_events=event is not None)

    async def _write_status(self, name: str, *, with_events: bool) -> None:
        cache = self.caches.get(name)
        if cache is None or not self._leading:
            return
        now = self.clock.now()
        events: tuple[CacheEvent, ...] | None = None
        if with_events:
            events = self._events.get(name)
            if events is None:
                events = await self.store.list_cache_events(name) or ()
                self._events[name] = events
        body = cb.render_status(
            cache,
            start_time=self._start_times.get(name, cache.created_at),
            now=now,
            events=events,
            message=self._message(name),
        )
        delay = 0.5
        for attempt in range(_STATUS_RETRIES):
            try:
                written = await self.api.patch_status(name, body)
                self._statuses[name] = written.get("status") or body
                self._check_status_images(written)
                return
            except Exception as exc:
                if getattr(exc, "is_not_found", False):
                    raise _Gone from None
                if attempt + 1 == _STATUS_RETRIES or not getattr(exc, "is_transient", False):
                    log.warning("image cache %s: could not write its status: %s", name, exc)
                    return
            await self.clock.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _check_status_images(self, written: JSON) -> None:
        """A written status that came back without its images: the cluster's CRD prunes them."""
        status = written.get("status")
        if self.status_images and isinstance(status, dict) and "images" not in status:
            self.status_images = False
            log.warning(
                "the ImageCache CRD in the cluster drops status.images (it was installed by an older "
                "vk-provider): apply config/crd-imagecache.yaml. Until then an agent that restarts after "
                "spec.images was edited takes the edited images as built"
            )


# ------------------------------------------------------------------ the Pod side


_OUTCOMES = {
    Outcome.EXPLICIT_HIT: "explicit_hit",
    Outcome.AUTO_HIT: "auto_hit",
    Outcome.MISS: "miss",
    Outcome.NO_CACHE: "none",
    Outcome.FAILED_NOT_FOUND: "failed",
    Outcome.FAILED_NOT_COMPLETE: "failed",
}


@dataclass(slots=True)
class _Hits:
    """Matches of one cache not yet written to the registry."""

    count: int
    last: datetime
    expires_at: datetime | None
    automatic: bool
    name: str


class CacheManager:
    """Implements the pod controller's ``CacheResolver`` over the controller's in-memory caches.

    A hit updates the in-memory index at once; the registry row (hit count, last match, expiry)
    is written by :meth:`run` in the background, hits to one cache coalesced into one write, so
    that no Pod waits on the database. The writer lets hits gather for ``linger_seconds`` (on
    ``clock``) after the first, so a burst of 1,000 hits is a handful of transactions, not one for
    every turn of the writer (each costs far more CPU than the rows in it).
    """

    def __init__(
        self,
        controller: ImageCacheController,
        manifests: ManifestSource,
        clock: Clock,
        *,
        default_auto: bool = False,
        linger_seconds: float = 0.25,
    ) -> None:
        self.controller = controller
        self.manifests = manifests
        self.clock = clock
        self.default_auto = default_auto
        self.linger_seconds = linger_seconds
        self._lock = asyncio.Lock()
        self.on_resolution: Callable[[PodFacts, Resolution], None] | None = None
        self._hits: dict[str, _Hits] = {}
        self._hits_waiting = asyncio.Event()
        self._writing_hits = asyncio.Lock()

    async def run(self, max_backoff: float = 5.0) -> None:
        """Write tallied hits to the registry as they come, forever; failures are retried (cancel to stop)."""
        backoff = 0.1
        while True:
            await self._hits_waiting.wait()
            if self.linger_seconds > 0:
                await self.clock.sleep(self.linger_seconds)  # let the rest of a burst's hits gather
            if await self.flush_hits():
                backoff = 0.1
            else:
                await asyncio.sleep(backoff)
                backoff = min(max_backoff, backoff * 2)

    async def flush_hits(self, *, show_expiries: bool = True) -> bool:
        """Write every hit tallied so far; False if a write failed (those hits stay tallied for a retry).

        Then, with ``show_expiries``, the expiries the hits moved go to the objects' status (after
        every row is written: a slow API server must not hold up the registry; not at shutdown).
        """
        moved: list[str] = []
        async with self._writing_hits:
            self._hits_waiting.clear()
            batch, self._hits = self._hits, {}
            ok = True
            for imc_id, hits in batch.items():
                extra: dict[str, Any] = {"expires_at": hits.expires_at} if hits.automatic else {}
                try:
                    await self.controller.store.mark_cache_matched(imc_id, hits.last, count=hits.count, **extra)
                except Exception as exc:
                    ok = False
                    log.warning("image cache %s: could not record %d matches: %s", imc_id, hits.count, exc)
                    self._tally(imc_id, hits)  # kept for the next try
                    continue
                if hits.automatic:  # a hit extends an automatic cache: its object says so too
                    moved.append(hits.name)
        if show_expiries:
            for name in moved:
                await self.controller.show_expiry(name)
        return ok

    def _tally(self, imc_id: str, hits: _Hits) -> None:
        """Add ``hits``; the later of the two tallies gives the time and expiry."""
        known = self._hits.get(imc_id)
        if known is not None:
            latest = hits if hits.last >= known.last else known
            hits = _Hits(hits.count + known.count, latest.last, latest.expires_at, latest.automatic, latest.name)
        self._hits[imc_id] = hits
        self._hits_waiting.set()

    async def resolve(self, pod: PodFacts) -> CacheDecision:
        images = tuple(c.image for c in pod.containers)
        if any(key == INSTANCE_ID for key, _ in pod.annotations):  # resolved before an agent restart?
            facts = PodCacheFacts(pod.uid, pod.namespace, pod.name, pod.annotation_map(), images)
            resumed = resume(facts, list(self.controller.caches.values()), default_auto=self.default_auto)
            if resumed is not None:
                return self._decision(pod, resumed, "")
        sizes = self._sizes(images)
        async with self._lock:
            now = self.clock.now()
            facts = PodCacheFacts(pod.uid, pod.namespace, pod.name, pod.annotation_map(), images)
            resolution = resolve(
                facts, list(self.controller.caches.values()), now, default_auto=self.default_auto, image_sizes=sizes
            )
            matched_expiry: datetime | None = None
            if resolution.outcome.is_hit and resolution.cache is not None:
                matched_expiry = self.controller.note_matched(resolution.cache, now)
            reserved: ImageCache | None = None
            evicted: tuple[ImageCache, ...] = ()
            refusal = ""
            if resolution.auto_create is not None:
                reserved, evicted, refusal = self.controller.reserve_automatic(
                    resolution.auto_create, self._cached(resolution.auto_create.images), now
                )
        if self.on_resolution is not None:
            self.on_resolution(pod, resolution)
        if resolution.outcome.is_hit and resolution.cache is not None:
            cache = resolution.cache
            self._tally(cache.imc_id, _Hits(1, now, matched_expiry, cache.automatic, cache.name))
        if reserved is not None:
            # Not created after all (e.g. the API server refused it): no ImageCacheAutoCreated Event.
            refusal = await self.controller.create_automatic(reserved, evicted, f"{pod.namespace}/{pod.name}", now)
        return self._decision(pod, resolution, refusal)

    def _sizes(self, images: Sequence[str]) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for image in images:
            found = self.manifests.manifest(image)
            if isinstance(found, ImageManifest):
                sizes[found.reference] = found.size
        return sizes

    def _cached(self, references: Sequence[str]) -> tuple[CachedImage, ...]:
        out: list[CachedImage] = []
        for reference in references:
            found = self.manifests.manifest(reference)
            if isinstance(found, ImageManifest):
                out.append(CachedImage(found.reference, found.size, found.digest))
            else:
                out.append(CachedImage(reference, 0))
        return tuple(out)

    def _decision(self, pod: PodFacts, resolution: Resolution, refusal: str) -> CacheDecision:
        events = resolution.events
        explanation = resolution.explanation
        if refusal:
            # The automatic cache was decided but the quota refused it: no AutoCreated Event.
            events = tuple(e for e in events if e.reason != "ImageCacheAutoCreated")
            explanation = f"{explanation}; not created: {refusal}"
        outcome = _OUTCOMES[resolution.outcome]
        if resolution.outcome.is_hit and resolution.images_to_pull:
            outcome = "partial"
        imc_id = resolution.matched_id
        if resolution.cache is not None:
            imc_id = resolution.cache.imc_id
        elif resolution.outcome.is_failure:
            imc_id = resolution.request.explicit_id or ""
        failure: tuple[str, str] | None = None
        if resolution.outcome.is_failure:
            reason = resolution.outcome.value
            message = next((e.message for e in events if e.reason == reason), resolution.explanation)
            cache = resolution.cache
            if (
                resolution.outcome is Outcome.FAILED_NOT_COMPLETE
                and cache is not None
                and cache.phase is CachePhase.FAILED
            ):
                # The Event keeps ECI's words; the Pod's status says this one will never complete.
                message += f" It failed ({cache.message or 'no reason given'}) and will not complete."
            failure = (reason, message)
        return CacheDecision(
            present_images=frozenset(resolution.covered_images) if resolution.outcome.is_hit else frozenset(),
            failure=failure,
            events=tuple(
                EventSpec(
                    pod.namespace,
                    pod.name,
                    pod.uid,
                    e.reason,
                    e.message,
                    e.type.value,
                    component=e.source_component,
                )
                for e in events
            ),
            annotations=dict(resolution.annotations),
            outcome=outcome,
            imc_id=imc_id,
            explanation=explanation,
        )
