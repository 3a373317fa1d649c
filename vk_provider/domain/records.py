"""Values the product records about what happened: Pod starts and ImageCache creation events.

PURE: stdlib only. No clocks, no I/O. The registry stores and returns these values; the
controllers build them. ``merge_cache_event`` holds the one rule about cache events (identical
events are counted, not repeated; only the latest ones are kept) so that the registry only
applies its result.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

MAX_CACHE_EVENTS = 50
"""ECI keeps the latest 50 creation events in an ImageCache's ``status.events``."""


class CacheOutcome(enum.StrEnum):
    """How a Pod's images were made present, as recorded for every Pod start.

    ``partial``: a cache was used but it lacked some of the Pod's images (those were pulled);
    ``none``: the Pod did not ask for a cache; ``failed``: the Pod could not start because of
    its cache (e.g. ImageCacheNotFound).
    """

    EXPLICIT_HIT = "explicit_hit"
    AUTO_HIT = "auto_hit"
    PARTIAL = "partial"
    MISS = "miss"
    NONE = "none"
    FAILED = "failed"

    @property
    def used_cache(self) -> bool:
        """A cache was matched for the Pod (a hit on its count): explicit, automatic or partial."""
        return self in (CacheOutcome.EXPLICIT_HIT, CacheOutcome.AUTO_HIT, CacheOutcome.PARTIAL)


@dataclass(frozen=True, slots=True)
class ImagePullRecord:
    """One image of a Pod start: bytes downloaded and simulated seconds spent making it present.

    ``from_cache`` is true when the image came from the Pod's ImageCache (nothing pulled).
    """

    reference: str
    bytes_pulled: int
    pull_seconds: float
    from_cache: bool = False


@dataclass(frozen=True, slots=True)
class PodStartRecord:
    """One Pod start, identified by the Pod's UID; every duration is in simulated seconds.

    ``startup_seconds`` runs from the Pod's creationTimestamp to all containers started;
    ``imc_id`` is the cache used (or tried), ``reason`` says why it was chosen.
    """

    pod_uid: str
    namespace: str
    name: str
    node: str
    outcome: CacheOutcome
    imc_id: str | None
    reason: str
    images: tuple[ImagePullRecord, ...]
    resolve_seconds: float
    snapshot_attach_seconds: float
    container_start_seconds: float
    startup_seconds: float
    created_at: datetime
    started_at: datetime
    labels: tuple[tuple[str, str], ...] = field(default=())

    @property
    def bytes_pulled(self) -> int:
        return sum(image.bytes_pulled for image in self.images)

    @property
    def pull_seconds(self) -> float:
        """Images are pulled one after another, so the Pod's pull time is their sum."""
        return sum(image.pull_seconds for image in self.images)


@dataclass(frozen=True, slots=True)
class CacheEvent:
    """One entry of an ImageCache's ``status.events``; ``type`` is ``Normal`` or ``Warning``."""

    type: str
    message: str
    count: int
    first_timestamp: datetime
    last_timestamp: datetime


def merge_cache_event(
    events: Sequence[CacheEvent],
    *,
    type: str,
    message: str,
    now: datetime,
    keep: int = MAX_CACHE_EVENTS,
) -> tuple[CacheEvent, ...]:
    """Add one occurrence of an event to ``events`` (oldest first) and return the new list.

    An event with the same type and message is counted again and moved to the end rather than
    repeated, as Kubernetes aggregates Events; then only the latest ``keep`` entries remain.
    """
    kept: list[CacheEvent] = []
    merged = CacheEvent(type=type, message=message, count=1, first_timestamp=now, last_timestamp=now)
    for event in events:
        if event.type == type and event.message == message:
            merged = replace(event, count=event.count + 1, last_timestamp=now)
        else:
            kept.append(event)
    kept.append(merged)
    return tuple(kept[-keep:]) if keep > 0 else ()
