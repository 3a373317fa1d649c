"""Shared value types of the domain: images, layers and image caches.

PURE: stdlib only. No clocks, no randomness, no I/O. Every other layer (registry, kube,
controllers) converts its own rows and API objects into these values at its edge, so the
pure decision code (matching, resolver, pull model) never sees an ORM row or an API dict.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Layer:
    """One image layer. ``size`` is the compressed (download) size in bytes."""

    digest: str
    size: int
    uncompressed_size: int


@dataclass(frozen=True, slots=True)
class ImageManifest:
    """An image resolved to its layers, for the node's platform.

    ``reference`` is the normalised reference (``docker.io/library/nginx:1.7.9``);
    ``source`` says where the layers came from: ``catalog``, ``registry`` or ``synthetic``.
    """

    reference: str
    digest: str
    layers: tuple[Layer, ...]
    source: str = "catalog"

    @property
    def size(self) -> int:
        """Compressed bytes of all layers (what a pull downloads at most)."""
        return sum(layer.size for layer in self.layers)

    @property
    def uncompressed_size(self) -> int:
        return sum(layer.uncompressed_size for layer in self.layers)


class CachePhase(enum.StrEnum):
    """ImageCache ``status.phase`` values, as ECI names them."""

    PREPARING = "Preparing"
    CREATING = "Creating"
    READY = "Ready"
    FAILED = "Failed"
    UPDATING = "Updating"
    UPDATE_FAILED = "UpdateFailed"


# The first word of the message of a cache refused because its kind's quota was used up.
QUOTA_FULL = "QuotaFull"


@dataclass(frozen=True, slots=True)
class CachedImage:
    """An image held by a cache: its normalised reference, digest and compressed size."""

    reference: str
    size: int
    digest: str = ""


@dataclass(frozen=True, slots=True)
class ImageCache:
    """What the product knows of one ImageCache, as the decision code needs it.

    ``size_gib`` is the cache's capacity (spec.imageCacheSize); ``images`` are the images it
    holds (for a cache still being built: the images it will hold).
    """

    imc_id: str
    name: str
    phase: CachePhase
    size_gib: int
    images: tuple[CachedImage, ...]
    automatic: bool
    created_at: datetime
    progress: int = 0
    last_matched_at: datetime | None = None
    expires_at: datetime | None = None
    message: str = ""
    labels: tuple[tuple[str, str], ...] = field(default=())

    def is_ready(self) -> bool:
        return self.phase is CachePhase.READY

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    @property
    def image_bytes(self) -> int:
        return sum(image.size for image in self.images)
