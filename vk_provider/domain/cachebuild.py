"""ImageCache builds and lifetimes: every decision the ImageCache controller makes, as pure functions.

Owns: reading an ImageCache object's spec (a mirror of the CRD's validation, for objects that
reached us without it), new ``imc-`` ids, what an object change means (create, resume, update,
refuse), the build's failure checks and progress arithmetic, expiry times (retention, failures,
automatic caches), quota and LRU eviction choices, and the ``status`` body written to the API
server. The controller gathers facts, calls these, then acts.

PURE: stdlib only, no I/O, no clock (``now`` is an argument) and no randomness of its own (an
injected ``random.Random``). It must not talk to the API server or the registry.

Decisions beyond ECI's documentation:

- Capacity: the images' total *uncompressed* size must fit ``imageCacheSize`` GiB, since the
  cache is a disk snapshot of extracted layers; layers shared between images count once.
- Progress: the pulled bytes take the cache from 0% to ``PULL_SHARE`` %, the snapshot step
  does the rest; 100% only in Ready.
- ``retentionDays`` counts from the cache's creation. Automatic caches expire 7 days after
  creation while never used, and 30 days after their last use (SPEC §4).
- A change of ``spec.images`` while the cache is not Ready or UpdateFailed is refused: the
  object keeps the new spec, the cache keeps its images, and ``status.message`` says why.
- Quotas: automatic caches at quota evict the least recently used automatic caches; manual
  caches at quota fail with ``QuotaFull`` unless LRU elimination is on for them too. Failed
  caches take no slot (a decision: they hold no snapshot, and expire 24 h after failing).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from vk_provider.domain.images import InvalidReference, parse_reference
from vk_provider.domain.model import QUOTA_FULL, CachePhase, ImageCache, ImageManifest
from vk_provider.domain.records import MAX_CACHE_EVENTS, CacheEvent

GIB = 1 << 30
IMC_ID_PREFIX = "imc-"
IMC_ID_LENGTH = 20
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"

MIN_IMAGES, MAX_IMAGES = 1, 20
MIN_SIZE_GIB, MAX_SIZE_GIB, DEFAULT_SIZE_GIB = 20, 32768, 20
MIN_RETENTION_DAYS, MAX_RETENTION_DAYS = 1, 65536

FAILED_RETENTION = timedelta(hours=24)
AUTO_UNUSED_RETENTION = timedelta(days=7)
AUTO_USED_RETENTION = timedelta(days=30)
PULL_SHARE = 95

# Keys the product puts on ImageCache objects it creates (not ECI's).
AUTOMATIC_LABEL = "vk-provider.io/automatic-cache"
ID_ANNOTATION = "vk-provider.io/image-cache-id"
CREATED_FOR_ANNOTATION = "vk-provider.io/created-for"
# ECI's optional ImageCache annotations: reuse layers other caches already hold (they are not
# pulled again by the build); flash: the cache is usable before its snapshot step completes.
REUSE_ANNOTATION = "k8s.aliyun.com/imc-enable-reuse"
FLASH_ANNOTATION = "k8s.aliyun.com/imc-enable-flash"

BUILDING = frozenset({CachePhase.PREPARING, CachePhase.CREATING, CachePhase.UPDATING})
_CHANGEABLE = frozenset({CachePhase.READY, CachePhase.UPDATE_FAILED})


def new_imc_id(rng: random.Random) -> str:
    """``imc-`` and 20 lowercase alphanumerics, like ECI's ids."""
    return IMC_ID_PREFIX + "".join(rng.choice(_ID_ALPHABET) for _ in range(IMC_ID_LENGTH))


def is_imc_id(text: str) -> bool:
    body = text[len(IMC_ID_PREFIX) :]
    return text.startswith(IMC_ID_PREFIX) and len(body) == IMC_ID_LENGTH and all(c in _ID_ALPHABET for c in body)


# ------------------------------------------------------------------ the spec


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """An ImageCache object's spec and the product's marks on it.

    ``images`` are as written, each once; ``references`` the same images normalised where they
    parse (an invalid one stays as written, so that it can be reported and compared).
    """

    images: tuple[str, ...]
    size_gib: int = DEFAULT_SIZE_GIB
    retention_days: int | None = None
    pull_secrets: tuple[str, ...] = ()
    automatic: bool = False
    requested_id: str = ""
    problems: tuple[str, ...] = ()
    reuse: bool = False  # k8s.aliyun.com/imc-enable-reuse
    flash: bool = False  # k8s.aliyun.com/imc-enable-flash

    @property
    def references(self) -> tuple[str, ...]:
        return tuple(_normalised(image) for image in self.images)


def parse_spec(
    spec: Mapping[str, Any] | None,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> CacheSpec:
    """Read an ImageCache's spec; what the CRD's validation would refuse becomes ``problems``."""
    spec = spec or {}
    problems: list[str] = []
    raw_images = spec.get("images")
    images: tuple[str, ...] = ()
    if not isinstance(raw_images, list) or not all(isinstance(i, str) and i for i in raw_images):
        problems.append("spec.images must be a list of image references")
    else:
        if not MIN_IMAGES <= len(raw_images) <= MAX_IMAGES:
            problems.append(f"spec.images must hold {MIN_IMAGES} to {MAX_IMAGES} images, got {len(raw_images)}")
        # An image listed twice (or as two spellings of one reference: redis:7, docker.io/library/redis:7)
        # is one image of the cache, as the registry keeps it: its first spelling stays.
        first: dict[str, str] = {}
        for image in raw_images:
            first.setdefault(_normalised(image), image)
        images = tuple(first.values())
    size = spec.get("imageCacheSize", DEFAULT_SIZE_GIB)
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE_GIB <= size <= MAX_SIZE_GIB:
        problems.append(f"spec.imageCacheSize must be a whole number of GiB from {MIN_SIZE_GIB} to {MAX_SIZE_GIB}")
        size = DEFAULT_SIZE_GIB
    retention = spec.get("retentionDays")
    if retention is not None and (
        isinstance(retention, bool)
        or not isinstance(retention, int)
        or not MIN_RETENTION_DAYS <= retention <= MAX_RETENTION_DAYS
    ):
        problems.append(f"spec.retentionDays must be from {MIN_RETENTION_DAYS} to {MAX_RETENTION_DAYS} days")
        retention = None
    secrets = spec.get("imagePullSecrets") or []
    if not isinstance(secrets, list) or not all(isinstance(s, str) and s.count(":") == 1 for s in secrets):
        problems.append("spec.imagePullSecrets must be a list of namespace:secretName")
        secrets = []
    annotations = annotations or {}
    return CacheSpec(
        images=images,
        size_gib=size,
        retention_days=retention,
        pull_secrets=tuple(secrets),
        automatic=(labels or {}).get(AUTOMATIC_LABEL) == "true",
        requested_id=annotations.get(ID_ANNOTATION, "") if is_imc_id(annotations.get(ID_ANNOTATION, "")) else "",
        problems=tuple(problems),
        reuse=str(annotations.get(REUSE_ANNOTATION, "")).strip().lower() == "true",
        flash=str(annotations.get(FLASH_ANNOTATION, "")).strip().lower() == "true",
    )


def _normalised(image: str) -> str:
    parsed = parse_reference(image)
    return image if isinstance(parsed, InvalidReference) else parsed.normalized


def auto_cache_body(name: str, imc_id: str, images: Sequence[str], size_gib: int, created_for: str) -> dict[str, Any]:
    """The ImageCache object for an automatic cache."""
    return {
        "apiVersion": "eci.alibabacloud.com/v1",
        "kind": "ImageCache",
        "metadata": {
            "name": name,
            "labels": {AUTOMATIC_LABEL: "true"},
            "annotations": {ID_ANNOTATION: imc_id, CREATED_FOR_ANNOTATION: created_for},
        },
        "spec": {"images": list(images), "imageCacheSize": size_gib},
    }


# ------------------------------------------------------------------ what a change means


class ChangeKind(enum.Enum):
    CREATE = "create"  # no cache of that name yet
    RESUME = "resume"  # a build was under way with no one building (agent restart, or a new automatic cache)
    UPDATE = "update"  # new images for a Ready or UpdateFailed cache
    NONE = "none"


class Keep(enum.Enum):
    """Marks "leave this field as it is" where None means "clear it"."""

    KEEP = "keep"


KEEP = Keep.KEEP


@dataclass(frozen=True, slots=True)
class Change:
    """What to do; ``refused``: the spec's images differ from the cache's and are not applied."""

    kind: ChangeKind
    refused: bool = False


REFUSAL_PREFIX = "the change of spec.images was not applied"


def plan_change(
    current: ImageCache | None,
    spec: CacheSpec,
    *,
    building: bool,
    refused: tuple[str, ...] | None = None,
    building_images: tuple[str, ...] | None = None,
) -> Change:
    """What an ImageCache object (new, or changed) asks of the cache ``current`` (None: no cache).

    ``building``: a build of it is running now, making ``building_images`` (an update's new
    images; a spec asking for exactly those asks for nothing more). ``refused``: the images of a
    change refused before; while the spec still asks for exactly those, they stay refused (a
    refusal is not applied later behind the user's back; a new change, in Ready or UpdateFailed, is).
    """
    if current is None:
        return Change(ChangeKind.CREATE)
    resume = ChangeKind.RESUME if not building and current.phase in BUILDING else ChangeKind.NONE
    if images_match(current, spec) or (building and building_images == spec.references):
        return Change(resume)
    if refused == spec.references or building or current.phase not in _CHANGEABLE:
        return Change(resume, refused=True)
    return Change(ChangeKind.UPDATE)


def refusal_message(phase: CachePhase) -> str:
    return (
        f"{REFUSAL_PREFIX}: the cache was {phase.value}, and its images can change only while it is "
        "Ready or UpdateFailed; set spec.images back, or change them again once it is Ready"
    )


def images_match(cache: ImageCache, spec: CacheSpec) -> bool:
    """The same images, in any order: listing them in another order is no reason to rebuild."""
    return sorted(image.reference for image in cache.images) == sorted(spec.references)


# ------------------------------------------------------------------ building


@dataclass(frozen=True, slots=True)
class BuildCheck:
    """The images to pull, or why the build fails (``failure`` non-empty)."""

    manifests: tuple[ImageManifest, ...]
    failure: str = ""
    total_bytes: int = 0
    uncompressed_bytes: int = 0


def check_build(
    spec: CacheSpec, resolved: Mapping[str, ImageManifest | InvalidReference | str | None], size_gib: int
) -> BuildCheck:
    """Can the cache be built? ``resolved`` maps each of ``spec.images`` to its manifest, or to
    why it cannot be resolved (a message; None: no reason known)."""
    if spec.problems:
        return BuildCheck((), "invalid spec: " + "; ".join(spec.problems))
    manifests: list[ImageManifest] = []
    for image in spec.images:
        found = resolved.get(image)
        if isinstance(found, InvalidReference):
            return BuildCheck((), f"image {image!r} cannot be resolved: {found.reason}")
        if found is None or isinstance(found, str):
            return BuildCheck(
                (), f"image {image!r} cannot be resolved: {found or 'no such image in the image catalog'}"
            )
        if all(m.reference != found.reference for m in manifests):  # an image listed twice is built once
            manifests.append(found)
    layers = {layer.digest: layer for manifest in manifests for layer in manifest.layers}
    compressed = sum(layer.size for layer in layers.values())
    uncompressed = sum(layer.uncompressed_size for layer in layers.values())
    if uncompressed > size_gib * GIB:
        return BuildCheck(
            tuple(manifests),
            f"the images need {uncompressed / GIB:.1f} GiB, more than the cache's imageCacheSize of {size_gib} GiB",
            compressed,
            uncompressed,
        )
    return BuildCheck(tuple(manifests), "", compressed, uncompressed)


def build_progress(done_bytes: int, total_bytes: int) -> int:
    """Percent shown while pulling: 0 → ``PULL_SHARE`` with the bytes pulled."""
    if total_bytes <= 0:
        return PULL_SHARE
    return max(0, min(PULL_SHARE, done_bytes * PULL_SHARE // total_bytes))


def progress_text(percent: int) -> str:
    return f"{max(0, min(100, percent))}%"


def parse_progress(text: object) -> int:
    if isinstance(text, str) and text.endswith("%") and text[:-1].isascii() and text[:-1].isdigit():
        return min(100, int(text[:-1]))
    return 0


# ------------------------------------------------------------------ lifetimes


def expiry_when_created(created_at: datetime, spec: CacheSpec) -> datetime | None:
    """Expiry of a cache in the making or Ready and never used."""
    if spec.automatic:
        return created_at + AUTO_UNUSED_RETENTION
    if spec.retention_days is not None:
        return created_at + timedelta(days=spec.retention_days)
    return None


def expiry_when_failed(now: datetime) -> datetime:
    return now + FAILED_RETENTION


def expiry_when_matched(cache: ImageCache, now: datetime) -> datetime | None:
    """Expiry after a Pod was given ``cache`` at ``now``: automatic caches live 30 more days."""
    if cache.automatic:
        return now + AUTO_USED_RETENTION
    return cache.expires_at


def expired(caches: Iterable[ImageCache], now: datetime) -> tuple[ImageCache, ...]:
    """The caches to delete at ``now``, the longest expired first."""
    found = [cache for cache in caches if cache.is_expired(now)]
    return tuple(sorted(found, key=lambda c: (c.expires_at or now, c.name)))


# ------------------------------------------------------------------ quotas


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """``evict`` go first; ``refusal`` non-empty: the new cache may not be made (QuotaFull)."""

    evict: tuple[ImageCache, ...] = ()
    refusal: str = ""


def _eviction_order(cache: ImageCache) -> tuple[datetime, datetime, str]:
    # The least recently used first (never matched: by creation).
    return cache.last_matched_at or cache.created_at, cache.created_at, cache.name


# Caches being built may not be evicted: Pods were just told they will get them (or share them).
_BUILDING = frozenset({CachePhase.PREPARING, CachePhase.CREATING, CachePhase.UPDATING})


def quota_decision(
    caches: Iterable[ImageCache], *, automatic: bool, quota: int, lru: bool, keep: frozenset[str] = frozenset()
) -> QuotaDecision:
    """Make room for one more cache of the kind ``automatic`` among ``caches`` (the cache to be
    made is not among them). ``keep`` names caches that must not be evicted, nor is a cache being
    built. Failed caches hold no snapshot and take no slot (they expire 24 h after failing): a
    refused cache does not keep the next one out once a slot is free."""
    same_kind = [cache for cache in caches if cache.automatic == automatic and cache.phase is not CachePhase.FAILED]
    excess = len(same_kind) + 1 - quota
    if excess <= 0:
        return QuotaDecision()
    kind = "automatic" if automatic else "manual"
    if not lru:
        return QuotaDecision(
            refusal=f"{QUOTA_FULL}: the quota of {quota} {kind} image caches is used up "
            "(delete a cache, or turn on LRU elimination with caches.lru_for_manual)"
        )
    candidates = sorted((c for c in same_kind if c.name not in keep and c.phase not in _BUILDING), key=_eviction_order)
    if len(candidates) < excess:
        return QuotaDecision(refusal=f"{QUOTA_FULL}: the quota of {quota} {kind} image caches is used up")
    return QuotaDecision(evict=tuple(candidates[:excess]))


# ------------------------------------------------------------------ status


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def render_events(events: Sequence[CacheEvent]) -> list[dict[str, Any]]:
    """``status.events``: the latest ``MAX_CACHE_EVENTS``, oldest first."""
    return [
        {
            "count": event.count,
            "firstTimestamp": rfc3339(event.first_timestamp),
            "lastTimestamp": rfc3339(event.last_timestamp),
            "message": event.message,
            "type": event.type,
        }
        for event in list(events)[-MAX_CACHE_EVENTS:]
    ]


def render_status(
    cache: ImageCache,
    *,
    start_time: datetime,
    now: datetime,
    events: Sequence[CacheEvent] | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    """The ``status`` of the ImageCache object for ``cache``, for a merge patch (a None clears).

    ``events`` None leaves the object's events as they are; ``message`` None means the cache's own.
    """
    status: dict[str, Any] = {
        "imageCacheId": cache.imc_id,
        "phase": cache.phase.value,
        "progress": progress_text(cache.progress),
        "startTime": rfc3339(start_time),
        "lastUpdatedTime": rfc3339(now),
        "expireDateTime": rfc3339(cache.expires_at) if cache.expires_at is not None else None,
        "message": (cache.message if message is None else message) or None,
        "images": [image.reference for image in cache.images],
    }
    if events is not None:
        status["events"] = render_events(events)
    return status


def status_differs(current: Mapping[str, Any] | None, cache: ImageCache, message: str, *, images: bool = True) -> bool:
    """Whether the object's status disagrees with the cache on what users read (id, phase,
    progress, expiry, message, and with ``images`` the images it holds): only then is a status
    patch due. ``images`` False: the cluster's CRD drops ``status.images``, so it never agrees."""
    current = current or {}
    want_expiry = rfc3339(cache.expires_at) if cache.expires_at is not None else None
    return (
        current.get("imageCacheId") != cache.imc_id
        or current.get("phase") != cache.phase.value
        or current.get("progress") != progress_text(cache.progress)
        or current.get("expireDateTime") != want_expiry
        or (current.get("message") or "") != message
        or (images and current.get("images") != [image.reference for image in cache.images])
    )


def status_images(status: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The images the builder says the cache holds (``status.images``, vk-provider's), or None
    when the status does not say: written by an older agent, pruned by an older CRD, or edited
    into something that is not a list of references (then the spec is all there is to go by)."""
    images = status.get("images")
    if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
        return None
    return tuple(_normalised(image) for image in images)  # as written; by hand, maybe not
