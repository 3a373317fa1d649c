"""Resolve a Pod's image-cache request against the known caches: one pure decision.

Owns SPEC §4 end to end: which cache (if any) a Pod uses, whether the Pod fails, what automatic
cache to create (or share) on a miss, the ECI Events to post and the annotations to write back.
The answer is a ``Resolution`` value; the caller applies it (posts Events, patches the Pod,
creates the cache, records last-matched time). This module must not do any of that itself.

PURE: stdlib only, no I/O, no clock (``now`` is an argument).

Decisions beyond ECI's documentation:

- An explicit cache that exists but has expired counts as not existing (``ImageCacheNotFound``):
  expired caches are being deleted and automatic matching ignores them too.
- An explicit hit whose cache lacks some of the Pod's images is still a hit; the rest is pulled.
- On a miss, an automatic cache with exactly the Pod's image set that is still being built
  (Preparing/Creating/Updating, unexpired) is shared instead of creating another one, so a burst
  of Pods with the same images makes one cache. The caller must make a cache it creates visible
  to later ``resolve`` calls (resolve and create serially) for this to work. Likewise a cache
  someone created (not automatic) with exactly the Pod's images that is still being built: no
  automatic copy of it is made (it would be newer, so it, not theirs, would take the hits).
- On a miss, no automatic cache is created while an automatic cache with exactly the Pod's image
  set failed to build less than ``AUTO_RETRY_AFTER_FAILURE`` (5 minutes) ago: a Deployment of
  Pods whose images cannot be cached would otherwise leave one Failed cache per Pod, while a
  registry error of a moment should not stop caching for the 24 h a Failed cache is kept.
  Deleting the Failed cache lets the next Pod try at once. A cache refused for the quota
  (``QuotaFull``) does not count: the quota may have room by the next Pod.
- The automatic cache's id is derived from the Pod's instance id, so the ``ImageCacheAutoCreated``
  Event can be decided here; the caller creates the cache with ``AutoCreateSpec.imc_id``.
- No automatic cache is created for a Pod with no valid images, or with more images than a cache
  may hold (``MAX_CACHE_IMAGES``); the miss is still reported.
- The instance-id annotation is written for every Pod that is not failed; the matched-cache
  annotation only on a hit. Read back (``resume``), they let a Pod taken again after an agent
  restart keep its decision instead of being resolved (and counted, and told) twice.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType

from vk_provider.domain import annotations as keys
from vk_provider.domain.annotations import (
    CacheRequest,
    base36_digest,
    instance_id_for,
    parse_cache_annotations,
)
from vk_provider.domain.cachebuild import FAILED_RETENTION
from vk_provider.domain.images import ImageRef, InvalidReference, matches, parse_reference, quote, shorten
from vk_provider.domain.matching import MatchResult, format_bytes, rank_caches
from vk_provider.domain.model import QUOTA_FULL, CachedImage, CachePhase, ImageCache

EVENT_SOURCE = "EciService"
INVALID_ANNOTATION_REASON = "InvalidImageCacheAnnotation"
AUTO_CACHE_SIZE_GIB = 30
MAX_CACHE_IMAGES = 20

_BUILDING_PHASES = frozenset({CachePhase.PREPARING, CachePhase.CREATING, CachePhase.UPDATING})
# After an automatic cache fails to build, misses with the same images make no new one for this
# long (the kubelet's longest image pull back-off): one Failed cache per burst, not one per Pod,
# and a registry that failed for a moment is tried again soon.
AUTO_RETRY_AFTER_FAILURE = timedelta(minutes=5)


class Outcome(enum.StrEnum):
    NO_CACHE = "NoCache"
    EXPLICIT_HIT = "ExplicitHit"
    AUTO_HIT = "AutoHit"
    MISS = "Miss"
    FAILED_NOT_FOUND = "ImageCacheNotFound"
    FAILED_NOT_COMPLETE = "ImageCacheNotComplete"

    @property
    def is_hit(self) -> bool:
        return self in (Outcome.EXPLICIT_HIT, Outcome.AUTO_HIT)

    @property
    def is_failure(self) -> bool:
        return self in (Outcome.FAILED_NOT_FOUND, Outcome.FAILED_NOT_COMPLETE)


class EventType(enum.StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


@dataclass(frozen=True, slots=True)
class PodEvent:
    reason: str
    type: EventType
    message: str
    source_component: str = EVENT_SOURCE


@dataclass(frozen=True, slots=True)
class PodCacheFacts:
    """What resolution needs to know of a Pod, gathered by the caller from the API object.

    ``images`` are the raw image strings of the init containers then the regular containers.
    """

    uid: str
    namespace: str
    name: str
    annotations: Mapping[str, str]
    images: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AutoCreateSpec:
    """The automatic cache to create after a miss."""

    name: str
    imc_id: str
    images: tuple[str, ...]
    size_gib: int = AUTO_CACHE_SIZE_GIB
    automatic: bool = True


@dataclass(frozen=True, slots=True)
class Resolution:
    """The decision for one Pod. ``cache`` is the cache used (hit) or named (explicit failure).

    ``covered_images`` are the Pod's distinct normalised images the cache holds;
    ``images_to_pull`` the rest of its valid images. ``invalid_images`` can be neither.
    """

    outcome: Outcome
    instance_id: str
    request: CacheRequest
    explanation: str
    cache: ImageCache | None = None
    covered_images: tuple[str, ...] = ()
    images_to_pull: tuple[str, ...] = ()
    invalid_images: tuple[InvalidReference, ...] = ()
    auto_create: AutoCreateSpec | None = None
    shared_with: ImageCache | None = None
    events: tuple[PodEvent, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    match: MatchResult | None = None
    matched_id: str = ""
    """A resumed hit (``resume``): the id of the cache it had matched, even if that cache is gone."""

    @property
    def failure_reason(self) -> str | None:
        """The Pod's failure reason, for a failed outcome."""
        return self.outcome.value if self.outcome.is_failure else None


def _match_count_problems(request: CacheRequest, distinct_images: int) -> tuple[str, ...]:
    """ "At least N of the Pod's images" with fewer than N images is read as all of them, and said so."""
    wanted = request.match_count_request
    if not request.auto or request.explicit_id is not None or request.perfect_match or wanted is None:
        return ()
    if distinct_images == 0 or wanted <= distinct_images:
        return ()
    images = f"{distinct_images} image{'s' if distinct_images != 1 else ''}"
    return (
        f"annotation {keys.MATCH_COUNT_REQUEST}={quote(str(wanted))} is more than the Pod's {images}; "
        "every one must be in the cache",
    )


def resolve(
    pod: PodCacheFacts,
    caches: Sequence[ImageCache],
    now: datetime,
    *,
    default_auto: bool,
    image_sizes: Mapping[str, int] | None = None,
) -> Resolution:
    """Decide how ``pod`` uses image caches. ``image_sizes`` (normalised ref → bytes) is optional
    and only makes the "cache large enough" check of automatic matching stricter."""
    request = parse_cache_annotations(pod.annotations, default_auto)
    wanted, invalid = _parse_images(pod.images)
    all_refs = tuple(ref.normalized for ref in wanted)
    instance_id = instance_id_for(pod.uid)
    problems = request.problems + _match_count_problems(request, len(all_refs) + len(invalid))
    problem_events = tuple(PodEvent(INVALID_ANNOTATION_REASON, EventType.WARNING, problem) for problem in problems)
    written = MappingProxyType({keys.INSTANCE_ID: instance_id})

    if request.explicit_id is not None:
        return _resolve_explicit(request, instance_id, wanted, invalid, caches, now, problem_events, written)

    if not request.auto:
        return Resolution(
            outcome=Outcome.NO_CACHE,
            explanation=f"automatic image cache matching is off ({request.auto_source})",
            images_to_pull=all_refs,
            events=problem_events,
            annotations=written,
            instance_id=instance_id,
            request=request,
            invalid_images=invalid,
        )

    result = rank_caches(
        wanted,
        caches,
        now,
        perfect_match=request.perfect_match,
        match_count_request=request.match_count_request,
        image_sizes=image_sizes,
    )
    if result.winner is not None:
        winner = result.winner
        covered = set(winner.matched)
        return Resolution(
            outcome=Outcome.AUTO_HIT,
            explanation=result.explanation,
            cache=winner.cache,
            covered_images=winner.matched,
            images_to_pull=tuple(ref for ref in all_refs if ref not in covered),
            events=(*problem_events, _hit_event(winner.cache.imc_id)),
            annotations=MappingProxyType({**written, keys.MATCHED_IMAGE_CACHE: winner.cache.imc_id}),
            match=result,
            instance_id=instance_id,
            request=request,
            invalid_images=invalid,
        )

    missed = PodEvent("ImageCacheMissed", EventType.WARNING, "[eci.imagecache]Missed image cache.")
    shared = _building_cache_with(frozenset(all_refs), caches, now) if all_refs else None
    if shared is not None:
        if shared.automatic:
            why = f"sharing {shared.imc_id} ({shared.phase}), an automatic cache being built with the same images"
            told: tuple[PodEvent, ...] = (missed, _auto_created_event(shared.imc_id))
        else:
            why = (
                f"no automatic cache created: {shared.imc_id} ({shared.name}), a cache of the same images, "
                f"is being built ({shared.phase})"
            )
            told = (missed,)
        return Resolution(
            outcome=Outcome.MISS,
            explanation=f"{result.explanation}; {why}",
            images_to_pull=all_refs,
            shared_with=shared,
            events=(*problem_events, *told),
            annotations=written,
            match=result,
            instance_id=instance_id,
            request=request,
            invalid_images=invalid,
        )

    auto_create: AutoCreateSpec | None = None
    failed = _failed_cache_with(frozenset(all_refs), caches, now) if all_refs else None
    if failed is not None:
        why = f" ({failed.message})" if failed.message else ""
        ago = (now - _failed_at(failed)).total_seconds()
        tail = (
            f"no automatic cache created: {failed.imc_id}, an automatic cache of the same images, "
            f"failed to build {ago:.0f} s ago{why}; another is tried "
            f"{AUTO_RETRY_AFTER_FAILURE.total_seconds() / 60:.0f} minutes after that failure (or once it is deleted)"
        )
    elif not all_refs:
        tail = "no automatic cache created: the Pod has no valid images"
    elif len(all_refs) > MAX_CACHE_IMAGES:
        tail = f"no automatic cache created: {len(all_refs)} images exceed the {MAX_CACHE_IMAGES} a cache holds"
    else:
        auto_create = AutoCreateSpec(
            name=f"auto-create-for-{instance_id}",
            imc_id=auto_cache_id_for(instance_id),
            images=all_refs,
        )
        tail = f"creating {auto_create.name} ({auto_create.imc_id})"
    events = (*problem_events, missed)
    if auto_create is not None:
        events = (*events, _auto_created_event(auto_create.imc_id))
    return Resolution(
        outcome=Outcome.MISS,
        explanation=f"{result.explanation}; {tail}",
        images_to_pull=all_refs,
        auto_create=auto_create,
        events=events,
        annotations=written,
        match=result,
        instance_id=instance_id,
        request=request,
        invalid_images=invalid,
    )


def resume(pod: PodCacheFacts, caches: Sequence[ImageCache], *, default_auto: bool) -> Resolution | None:
    """The decision an earlier run of the node made for ``pod``, read back from the annotations
    it wrote with the Pod's status (the instance id; the matched cache on a hit), or ``None`` if
    none was made. A Pod taken again after an agent restart keeps that decision: its Events were
    posted and its hit counted then, so the resumed one has no Events, writes nothing and creates
    no cache."""
    instance_id = instance_id_for(pod.uid)
    if pod.annotations.get(keys.INSTANCE_ID) != instance_id:
        return None  # never resolved, or annotations copied from another Pod
    request = parse_cache_annotations(pod.annotations, default_auto)
    wanted, invalid = _parse_images(pod.images)
    all_refs = tuple(ref.normalized for ref in wanted)
    matched = pod.annotations.get(keys.MATCHED_IMAGE_CACHE, "")
    if not matched:
        used = request.explicit_id is not None or request.auto
        return Resolution(
            outcome=Outcome.MISS if used else Outcome.NO_CACHE,
            instance_id=instance_id,
            request=request,
            explanation="taken again after an agent restart: no image cache had been matched",
            images_to_pull=all_refs,
            invalid_images=invalid,
        )
    cache = next((c for c in caches if c.imc_id == matched), None)
    covered = _covered(wanted, cache.images if cache is not None else ())
    gone = "" if cache is not None else ", which is gone since: every image is pulled"
    return Resolution(
        outcome=Outcome.EXPLICIT_HIT if request.explicit_id is not None else Outcome.AUTO_HIT,
        instance_id=instance_id,
        request=request,
        explanation=f"taken again after an agent restart: it had matched {matched}{gone}",
        cache=cache,
        covered_images=covered,
        images_to_pull=tuple(ref for ref in all_refs if ref not in covered),
        invalid_images=invalid,
        matched_id=matched,
    )


def auto_cache_id_for(instance_id: str) -> str:
    """The id of the automatic cache created for the Pod with ``instance_id``."""
    return "imc-" + base36_digest(f"auto-create-for-{instance_id}", 20)


def _resolve_explicit(
    request: CacheRequest,
    instance_id: str,
    wanted: Sequence[ImageRef],
    invalid: tuple[InvalidReference, ...],
    caches: Sequence[ImageCache],
    now: datetime,
    problem_events: tuple[PodEvent, ...],
    written: Mapping[str, str],
) -> Resolution:
    explicit_id = request.explicit_id or ""
    all_refs = tuple(ref.normalized for ref in wanted)
    cache = next((cache for cache in caches if cache.imc_id == explicit_id), None)
    shown = shorten(explicit_id)
    if cache is None or cache.is_expired(now):
        why = "does not exist" if cache is None else "has expired"
        return Resolution(
            outcome=Outcome.FAILED_NOT_FOUND,
            explanation=f"the explicitly requested image cache {shown} {why}",
            cache=cache,
            images_to_pull=all_refs,
            events=(
                *problem_events,
                PodEvent(
                    "ImageCacheNotFound",
                    EventType.WARNING,
                    f"The specified image cache {shown} does not exist.",
                ),
            ),
            instance_id=instance_id,
            request=request,
            invalid_images=invalid,
        )
    if not cache.is_ready():
        return Resolution(
            outcome=Outcome.FAILED_NOT_COMPLETE,
            explanation=f"the explicitly requested image cache {shown} is {cache.phase}, not Ready",
            cache=cache,
            images_to_pull=all_refs,
            events=(
                *problem_events,
                PodEvent(
                    "ImageCacheNotComplete",
                    EventType.NORMAL,
                    f"The production for specified image cache {shown} is not yet complete.",
                ),
            ),
            instance_id=instance_id,
            request=request,
            invalid_images=invalid,
        )
    covered = _covered(wanted, cache.images)
    covered_set = set(covered)
    covered_bytes = sum(image.size for image in cache.images if any(matches(image, ref) for ref in wanted))
    partial = "" if len(covered) == len(all_refs) else " (partial hit: the rest is pulled)"
    return Resolution(
        outcome=Outcome.EXPLICIT_HIT,
        explanation=(
            f"explicitly requested {cache.imc_id} holds {len(covered)}/{len(all_refs)} images "
            f"({format_bytes(covered_bytes)}){partial}"
        ),
        cache=cache,
        covered_images=covered,
        images_to_pull=tuple(ref for ref in all_refs if ref not in covered_set),
        events=(*problem_events, _hit_event(cache.imc_id)),
        annotations=MappingProxyType({**written, keys.MATCHED_IMAGE_CACHE: cache.imc_id}),
        instance_id=instance_id,
        request=request,
        invalid_images=invalid,
    )


def _parse_images(images: Sequence[str]) -> tuple[tuple[ImageRef, ...], tuple[InvalidReference, ...]]:
    """Distinct valid references in the Pod's order, and the invalid ones."""
    valid: dict[str, ImageRef] = {}
    invalid: list[InvalidReference] = []
    for text in images:
        parsed = parse_reference(text)
        if isinstance(parsed, InvalidReference):
            invalid.append(parsed)
        else:
            valid.setdefault(parsed.normalized, parsed)
    return tuple(valid.values()), tuple(invalid)


def _building_cache_with(refs: frozenset[str], caches: Sequence[ImageCache], now: datetime) -> ImageCache | None:
    """The cache (automatic or not) already being built with exactly ``refs``; the oldest if
    several, because that is the one earlier Pods of a burst were told to share."""
    best: ImageCache | None = None
    for cache in caches:
        if cache.phase not in _BUILDING_PHASES or cache.is_expired(now):
            continue
        if not _holds_exactly(cache, refs):
            continue
        if best is None or (cache.created_at, cache.imc_id) < (best.created_at, best.imc_id):
            best = cache
    return best


def _covered(wanted: Sequence[ImageRef], held: Sequence[CachedImage]) -> tuple[str, ...]:
    """The normalised references of the Pod's ``wanted`` images that the ``held`` images serve."""
    return tuple(ref.normalized for ref in wanted if any(matches(image, ref) for image in held))


def _holds_exactly(cache: ImageCache, refs: frozenset[str]) -> bool:
    """Whether the cache's image set is ``refs`` (order and repeats aside)."""
    return len(cache.images) >= len(refs) and frozenset(image.reference for image in cache.images) == refs


def _failed_cache_with(refs: frozenset[str], caches: Sequence[ImageCache], now: datetime) -> ImageCache | None:
    """The newest automatic cache with exactly ``refs`` whose build failed less than
    ``AUTO_RETRY_AFTER_FAILURE`` ago (not one refused for the quota, which may have room now)."""
    best: ImageCache | None = None
    for cache in caches:
        if not cache.automatic or cache.phase is not CachePhase.FAILED or cache.is_expired(now):
            continue
        if cache.message.startswith(QUOTA_FULL) or now - _failed_at(cache) >= AUTO_RETRY_AFTER_FAILURE:
            continue
        if not _holds_exactly(cache, refs):
            continue
        if best is None or (cache.created_at, cache.imc_id) > (best.created_at, best.imc_id):
            best = cache
    return best


def _failed_at(cache: ImageCache) -> datetime:
    # A Failed cache expires FAILED_RETENTION after it failed (cachebuild.expiry_when_failed).
    return cache.expires_at - FAILED_RETENTION if cache.expires_at is not None else cache.created_at


def _hit_event(imc_id: str) -> PodEvent:
    return PodEvent(
        "SuccessfulHitImageCache",
        EventType.NORMAL,
        f"[eci.imagecache]Successfully hit image cache {imc_id}, eci will be scheduled with this image cache.",
    )


def _auto_created_event(imc_id: str) -> PodEvent:
    return PodEvent("ImageCacheAutoCreated", EventType.NORMAL, f"[eci.imagecache]Image cache {imc_id} is auto created")
