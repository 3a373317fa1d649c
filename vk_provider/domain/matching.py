"""Automatic image-cache matching: rank the known caches for one Pod's images.

Owns ECI's matching policy as one pure function, ``rank_caches``, and the explanation of why
the winner won. It must not look anything up, parse annotations or decide what happens on a
miss; the resolver does that.

PURE: stdlib only, no I/O, no clock (``now`` is an argument).

The policy (ECI, with decisions marked):

- Candidates are Ready, unexpired caches that hold at least one of the Pod's images (a cache
  matching none never wins).
- "Large enough" (decision): the cache becomes the Pod's image store, and the images it lacks
  are pulled into it, so its capacity (``size_gib`` GiB) must hold all of the Pod's distinct
  images: the ones it holds at the size it recorded for them, plus the others at the size the
  caller gives in ``image_sizes`` (unknown sizes count as 0, so without ``image_sizes`` only the
  matched images count).
- ``perfect_match``: every distinct image must be held. ``match_count_request`` N: at least N
  must be; N above the Pod's image count is clamped to it. Perfect match wins if both are set.
- Rank by (1) match degree, the number of the Pod's distinct images held; (2) the bytes of the
  matched images, larger first (decision: the sum over the cache's distinct references that
  satisfy at least one of the Pod's images, so it does not depend on the order of the cache's
  image list); (3) creation time, newest first; (4) ``imc_id``, so the result
  never depends on the order the caches came in.

Speed: one call ranks ~10,000 caches in well under 5 ms. The Pod's references are parsed once
per call; a cached image costs a couple of set look-ups and is only parsed (once per distinct
reference, memoised for the call) when it could possibly match.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from vk_provider.domain.images import ImageRef, InvalidReference, matches_parsed, parse_reference
from vk_provider.domain.model import CachePhase, ImageCache

GIB = 2**30
RANKED_LIMIT = 10
"""How many of the best candidates ``MatchResult.ranked`` keeps (debugging aid only)."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A cache that passed every filter, with what it holds of the Pod's images."""

    cache: ImageCache
    matched: tuple[str, ...]
    """Normalised references of the Pod's images the cache holds, in the Pod's order."""
    matched_bytes: int

    @property
    def degree(self) -> int:
        return len(self.matched)


@dataclass(frozen=True, slots=True)
class Exclusions:
    """Ready caches that held some of the Pod's images but were filtered out, by reason."""

    expired: int = 0
    too_small: int = 0
    below_request: int = 0

    @property
    def total(self) -> int:
        return self.expired + self.too_small + self.below_request


@dataclass(frozen=True, slots=True)
class MatchResult:
    winner: Candidate | None
    explanation: str
    ranked: tuple[Candidate, ...]
    """The best ``RANKED_LIMIT`` candidates, best first (the winner is ``ranked[0]``)."""
    wanted_count: int
    required_degree: int
    candidate_count: int
    exclusions: Exclusions = field(default_factory=Exclusions)


def rank_caches(
    wanted: Sequence[ImageRef],
    caches: Iterable[ImageCache],
    now: datetime,
    *,
    perfect_match: bool,
    match_count_request: int | None,
    image_sizes: Mapping[str, int] | None = None,
) -> MatchResult:
    """Pick the best cache for a Pod wanting ``wanted`` (duplicates are counted once).

    ``image_sizes`` maps normalised references to compressed bytes, when the caller knows them;
    it only feeds the "large enough" check.
    """
    distinct = _distinct(wanted)
    count = len(distinct)
    required = _required_degree(count, perfect_match, match_count_request)
    index = _WantedIndex(distinct)
    sizes = image_sizes or {}
    wanted_sizes = [sizes.get(ref.normalized, 0) for ref in distinct]
    all_wanted_bytes = sum(wanted_sizes)

    # Sort keys: smaller is better. Ages instead of datetimes so "newest first" is ascending;
    # the position in ``keyed`` keeps tuples from ever comparing two ImageCache values.
    keyed: list[tuple[int, int, timedelta, str, int, ImageCache, int, int]] = []
    expired = too_small = below = 0
    ready = CachePhase.READY
    # The pre-filter of _WantedIndex is inlined: this loop runs once per cached image.
    name_tags = index.name_tags
    digests = index.digests
    exact = index.exact
    for cache in caches:
        if cache.phase is not ready:
            continue
        mask = 0
        serving: dict[str, int] | None = None
        for image in cache.images:
            reference = image.reference
            if reference in name_tags or "@" in reference or (digests and image.digest in digests):
                hit = exact(reference, image.digest)
                if hit:
                    mask |= hit
                    if serving is None:
                        serving = {}
                    serving[reference] = max(image.size, serving.get(reference, 0))
        if serving is None:
            continue
        matched_bytes = sum(serving.values())
        if cache.expires_at is not None and cache.expires_at <= now:
            expired += 1
            continue
        if all_wanted_bytes or matched_bytes:
            needed = matched_bytes + all_wanted_bytes - _bytes_of(mask, wanted_sizes)
            if cache.size_gib * GIB < needed:
                too_small += 1
                continue
        degree = mask.bit_count()
        if degree < required:
            below += 1
            continue
        keyed.append(
            (
                -degree,
                -matched_bytes,
                now - cache.created_at,
                cache.imc_id,
                len(keyed),
                cache,
                mask,
                matched_bytes,
            )
        )

    best = heapq.nsmallest(RANKED_LIMIT, keyed)
    ranked = tuple(
        Candidate(cache=item[5], matched=_refs_of(item[6], distinct), matched_bytes=item[7]) for item in best
    )
    exclusions = Exclusions(expired=expired, too_small=too_small, below_request=below)
    winner = ranked[0] if ranked else None
    explanation = _explain(ranked, count, required, perfect_match, exclusions)
    return MatchResult(
        winner=winner,
        explanation=explanation,
        ranked=ranked,
        wanted_count=count,
        required_degree=required,
        candidate_count=len(keyed),
        exclusions=exclusions,
    )


def format_bytes(size: int) -> str:
    """Decimal units, as image sizes are usually quoted ("a 386 MB image")."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{size} B"


class _WantedIndex:
    """Answers "which of the Pod's images does this cached image satisfy?" as a bitmask.

    Exact answers come from ``images.matches_parsed``, memoised per (reference, digest) for the call.
    Callers may skip ``exact`` for a cached image that provably cannot match: a normalised
    reference without '@' that is not in ``name_tags`` and whose digest is not in ``digests``.
    """

    def __init__(self, wanted: Sequence[ImageRef]) -> None:
        self._wanted = tuple(wanted)
        self.name_tags = frozenset(f"{ref.name}:{ref.tag}" for ref in wanted if ref.tag is not None)
        self.digests = frozenset(ref.digest for ref in wanted if ref.digest is not None)
        self._memo: dict[tuple[str, str], int] = {}

    def exact(self, reference: str, digest: str) -> int:
        key = (reference, digest)
        mask = self._memo.get(key)
        if mask is None:
            mask = self._compute(reference, digest)
            self._memo[key] = mask
        return mask

    def _compute(self, reference: str, digest: str) -> int:
        cached = parse_reference(reference)
        if isinstance(cached, InvalidReference):
            return 0
        mask = 0
        for position, wanted in enumerate(self._wanted):
            if matches_parsed(cached, digest, wanted):
                mask |= 1 << position
        return mask


def _distinct(wanted: Sequence[ImageRef]) -> tuple[ImageRef, ...]:
    seen: dict[str, ImageRef] = {}
    for ref in wanted:
        seen.setdefault(ref.normalized, ref)
    return tuple(seen.values())


def _required_degree(count: int, perfect_match: bool, match_count_request: int | None) -> int:
    if perfect_match:
        return count
    if match_count_request is not None:
        return max(1, min(match_count_request, count))
    return 1


def _bytes_of(mask: int, sizes: Sequence[int]) -> int:
    total = 0
    for position, size in enumerate(sizes):
        if mask >> position & 1:
            total += size
    return total


def _refs_of(mask: int, wanted: Sequence[ImageRef]) -> tuple[str, ...]:
    return tuple(ref.normalized for position, ref in enumerate(wanted) if mask >> position & 1)


def _requirement(count: int, required: int, perfect_match: bool) -> str:
    if perfect_match:
        return f"perfect match required: all {count}"
    return f"at least {required} of {count} required"


def _explain(
    ranked: Sequence[Candidate],
    count: int,
    required: int,
    perfect_match: bool,
    exclusions: Exclusions,
) -> str:
    if count == 0:
        return "the Pod has no valid image references to match"
    if not ranked:
        if not exclusions.total:
            return f"no Ready cache holds any of the Pod's {count} image(s)"
        reasons = [
            f"{number} {why}"
            for number, why in (
                (exclusions.expired, "expired"),
                (exclusions.too_small, "too small for the Pod's images"),
                (
                    exclusions.below_request,
                    f"matched too few images ({_requirement(count, required, perfect_match)})",
                ),
            )
            if number
        ]
        return f"no cache qualified: of the Ready caches holding some of the Pod's {count} image(s), " + (
            ", ".join(reasons)
        )
    winner = ranked[0]
    head = f"{winner.cache.imc_id} matched {winner.degree}/{count} images ({format_bytes(winner.matched_bytes)})"
    if required > 1:
        head += f" [{_requirement(count, required, perfect_match)}]"
    if len(ranked) == 1:
        return f"{head}; the only qualifying cache"
    return f"{head}; beat {ranked[1].cache.imc_id} on {_decider(winner, ranked[1], count)}"


def _decider(winner: Candidate, runner_up: Candidate, count: int) -> str:
    if winner.degree != runner_up.degree:
        return f"match degree ({runner_up.degree}/{count})"
    if winner.matched_bytes != runner_up.matched_bytes:
        return f"matched size ({format_bytes(runner_up.matched_bytes)})"
    if winner.cache.created_at != runner_up.cache.created_at:
        return f"creation time (created {runner_up.cache.created_at.isoformat()}, older)"
    return "cache id order (a tie on every other criterion)"
