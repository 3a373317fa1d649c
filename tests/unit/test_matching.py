"""Automatic matching: filters, each ranking criterion and tie-break, requirements, explanation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vk_provider.domain.images import ImageRef, matches, parse_reference
from vk_provider.domain.matching import GIB, RANKED_LIMIT, format_bytes, rank_caches
from vk_provider.domain.model import CachedImage, CachePhase, ImageCache

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MB = 10**6
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64

NGINX = "docker.io/library/nginx:1.7.9"
REDIS = "docker.io/library/redis:7"
APP = "registry.example.com/team/app:v1"


def ref(text: str) -> ImageRef:
    parsed = parse_reference(text)
    assert isinstance(parsed, ImageRef)
    return parsed


def cache(
    imc_id: str,
    *images: tuple[str, int] | CachedImage,
    phase: CachePhase = CachePhase.READY,
    size_gib: int = 20,
    age_hours: int = 1,
    expires_in_hours: int | None = None,
) -> ImageCache:
    return ImageCache(
        imc_id=imc_id,
        name=imc_id,
        phase=phase,
        size_gib=size_gib,
        images=tuple(image if isinstance(image, CachedImage) else CachedImage(*image) for image in images),
        automatic=False,
        created_at=NOW - timedelta(hours=age_hours),
        expires_at=None if expires_in_hours is None else NOW + timedelta(hours=expires_in_hours),
    )


@dataclass(frozen=True)
class Case:
    id: str
    wanted: tuple[str, ...]
    caches: tuple[ImageCache, ...]
    winner: str | None
    explanation: str
    perfect_match: bool = False
    match_count_request: int | None = None
    image_sizes: tuple[tuple[str, int], ...] = ()


CASES = [
    Case(
        "match degree beats size",
        ("nginx:1.7.9", "redis:7"),
        (
            cache("imc-big", (NGINX, 900 * MB)),
            cache("imc-both", (NGINX, 200 * MB), (REDIS, 186 * MB)),
        ),
        "imc-both",
        "imc-both matched 2/2 images (386 MB); beat imc-big on match degree (1/2)",
    ),
    Case(
        "matched size beats age",
        ("nginx:1.7.9", "redis:7"),
        (
            cache("imc-new", (NGINX, 100 * MB), age_hours=1),
            cache("imc-old", (REDIS, 300 * MB), age_hours=100),
        ),
        "imc-old",
        "imc-old matched 1/2 images (300 MB); beat imc-new on matched size (100 MB)",
    ),
    Case(
        "unmatched images do not count towards size",
        ("nginx:1.7.9",),
        (
            cache("imc-a", (NGINX, 100 * MB), (REDIS, 5000 * MB)),
            cache("imc-b", (NGINX, 101 * MB)),
        ),
        "imc-b",
        "imc-b matched 1/1 images (101 MB); beat imc-a on matched size (100 MB)",
    ),
    Case(
        "newest wins on equal degree and size",
        ("nginx:1.7.9",),
        (
            cache("imc-old", (NGINX, 100 * MB), age_hours=48),
            cache("imc-new", (NGINX, 100 * MB), age_hours=2),
        ),
        "imc-new",
        "imc-new matched 1/1 images (100 MB); beat imc-old on creation time (created 2026-02-27T12:00:00+00:00, older)",
    ),
    Case(
        "imc id breaks a full tie",
        ("nginx:1.7.9",),
        (cache("imc-b", (NGINX, 100 * MB)), cache("imc-a", (NGINX, 100 * MB))),
        "imc-a",
        "imc-a matched 1/1 images (100 MB); beat imc-b on cache id order (a tie on every other criterion)",
    ),
    Case(
        "a single candidate",
        ("nginx",),
        (cache("imc-a", ("docker.io/library/nginx:latest", 5 * MB)),),
        "imc-a",
        "imc-a matched 1/1 images (5.0 MB); the only qualifying cache",
    ),
    Case(
        "zero matches never win",
        ("nginx:1.7.9",),
        (cache("imc-a", (REDIS, 100 * MB)), cache("imc-b")),
        None,
        "no Ready cache holds any of the Pod's 1 image(s)",
    ),
    Case(
        "not Ready caches are no candidates",
        ("nginx:1.7.9",),
        tuple(
            cache(f"imc-{phase.value.lower()}", (NGINX, MB), phase=phase)
            for phase in CachePhase
            if phase is not CachePhase.READY
        ),
        None,
        "no Ready cache holds any of the Pod's 1 image(s)",
    ),
    Case(
        "expired caches are excluded, at the instant too",
        ("nginx:1.7.9",),
        (
            cache("imc-expired", (NGINX, 900 * MB), expires_in_hours=-1),
            cache("imc-now", (NGINX, 900 * MB), expires_in_hours=0),
            cache("imc-later", (NGINX, 100 * MB), expires_in_hours=1),
        ),
        "imc-later",
        "imc-later matched 1/1 images (100 MB); the only qualifying cache",
    ),
    Case(
        "all expired",
        ("nginx:1.7.9",),
        (cache("imc-expired", (NGINX, MB), expires_in_hours=-1),),
        None,
        "no cache qualified: of the Ready caches holding some of the Pod's 1 image(s), 1 expired",
    ),
    Case(
        "too small for the matched images",
        ("nginx:1.7.9",),
        (cache("imc-small", (NGINX, 21 * GIB), size_gib=20), cache("imc-ok", (NGINX, 20 * GIB), size_gib=20)),
        "imc-ok",
        "imc-ok matched 1/1 images (21 GB); the only qualifying cache",
    ),
    Case(
        "too small once the images it lacks are counted",
        ("nginx:1.7.9", "redis:7"),
        (cache("imc-small", (NGINX, 10 * GIB), size_gib=20), cache("imc-large", (NGINX, 10 * GIB), size_gib=30)),
        "imc-large",
        "imc-large matched 1/2 images (11 GB); the only qualifying cache",
        image_sizes=((REDIS, 15 * GIB),),
    ),
    Case(
        "all too small",
        ("nginx:1.7.9", "redis:7"),
        (cache("imc-small", (NGINX, 10 * GIB), size_gib=20),),
        None,
        "no cache qualified: of the Ready caches holding some of the Pod's 2 image(s), "
        "1 too small for the Pod's images",
        image_sizes=((REDIS, 15 * GIB),),
    ),
    Case(
        "perfect match excludes partial caches",
        ("nginx:1.7.9", "redis:7"),
        (
            cache("imc-partial", (NGINX, 900 * MB), age_hours=1),
            cache("imc-full", (NGINX, 10 * MB), (REDIS, 10 * MB), age_hours=9),
        ),
        "imc-full",
        "imc-full matched 2/2 images (20 MB) [perfect match required: all 2]; the only qualifying cache",
        perfect_match=True,
    ),
    Case(
        "perfect match with no full cache",
        ("nginx:1.7.9", "redis:7"),
        (cache("imc-partial", (NGINX, 900 * MB)),),
        None,
        "no cache qualified: of the Ready caches holding some of the Pod's 2 image(s), "
        "1 matched too few images (perfect match required: all 2)",
        perfect_match=True,
    ),
    Case(
        "match count request",
        ("nginx:1.7.9", "redis:7", APP),
        (
            cache("imc-one", (NGINX, 900 * MB)),
            cache("imc-two", (NGINX, MB), (APP, MB)),
        ),
        "imc-two",
        "imc-two matched 2/3 images (2.0 MB) [at least 2 of 3 required]; the only qualifying cache",
        match_count_request=2,
    ),
    Case(
        "match count request above the image count is clamped",
        ("nginx:1.7.9",),
        (cache("imc-one", (NGINX, MB)),),
        "imc-one",
        "imc-one matched 1/1 images (1.0 MB); the only qualifying cache",
        match_count_request=5,
    ),
    Case(
        "perfect match wins over a match count request",
        ("nginx:1.7.9", "redis:7"),
        (cache("imc-one", (NGINX, MB)),),
        None,
        "no cache qualified: of the Ready caches holding some of the Pod's 2 image(s), "
        "1 matched too few images (perfect match required: all 2)",
        perfect_match=True,
        match_count_request=1,
    ),
    Case(
        "Docker Hub spellings and duplicate containers count once",
        ("nginx:1.7.9", "docker.io/library/nginx:1.7.9", "index.docker.io/nginx:1.7.9"),
        (cache("imc-a", (NGINX, 386 * MB)),),
        "imc-a",
        "imc-a matched 1/1 images (386 MB); the only qualifying cache",
        perfect_match=True,
    ),
    Case(
        "a Pod pinned by digest matches a tag cached with that digest",
        ("nginx@" + DIGEST_A,),
        (
            cache("imc-other", CachedImage(NGINX, 900 * MB, DIGEST_B)),
            cache("imc-same", CachedImage(NGINX, MB, DIGEST_A)),
        ),
        "imc-same",
        "imc-same matched 1/1 images (1.0 MB); the only qualifying cache",
    ),
    Case(
        "a cached reference with a digest matches the Pod's tag",
        ("nginx:1.7.9",),
        (cache("imc-a", (f"{NGINX}@{DIGEST_A}", MB)),),
        "imc-a",
        "imc-a matched 1/1 images (1.0 MB); the only qualifying cache",
    ),
    Case(
        "identical cached entries count once",
        ("nginx:1.7.9",),
        (
            cache("imc-dup", (NGINX, 100 * MB), (NGINX, 100 * MB)),
            cache("imc-one", (NGINX, 150 * MB)),
        ),
        "imc-one",
        "imc-one matched 1/1 images (150 MB); beat imc-dup on matched size (100 MB)",
    ),
    Case(
        "every distinct cached reference serving the Pod counts, whatever its order",
        ("nginx:1.7.9",),
        (
            cache("imc-two", (NGINX, 10 * MB), (f"{NGINX}@{DIGEST_A}", 100 * MB)),
            cache("imc-owt", (f"{NGINX}@{DIGEST_A}", 100 * MB), (NGINX, 10 * MB), age_hours=2),
        ),
        "imc-two",
        "imc-two matched 1/1 images (110 MB); beat imc-owt on creation time (created 2026-03-01T10:00:00+00:00, older)",
    ),
    Case(
        "no images wanted",
        (),
        (cache("imc-a", (NGINX, MB)),),
        None,
        "the Pod has no valid image references to match",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_rank_caches(case: Case) -> None:
    result = rank_caches(
        [ref(text) for text in case.wanted],
        case.caches,
        NOW,
        perfect_match=case.perfect_match,
        match_count_request=case.match_count_request,
        image_sizes=dict(case.image_sizes) or None,
    )
    assert (result.winner.cache.imc_id if result.winner else None) == case.winner
    assert result.explanation == case.explanation
    assert (result.ranked[0] if result.ranked else None) == result.winner


@pytest.mark.parametrize("order", [1, -1])
def test_ranking_does_not_depend_on_input_order(order: int) -> None:
    caches = [cache(f"imc-{number:02d}", (NGINX, 100 * MB)) for number in range(30)]
    result = rank_caches([ref("nginx:1.7.9")], caches[::order], NOW, perfect_match=False, match_count_request=None)
    assert result.winner is not None
    assert result.winner.cache.imc_id == "imc-00"
    assert [candidate.cache.imc_id for candidate in result.ranked] == [f"imc-{n:02d}" for n in range(RANKED_LIMIT)]
    assert result.candidate_count == 30


def test_winner_reports_what_it_covers_in_pod_order() -> None:
    result = rank_caches(
        [ref(APP), ref("redis:7"), ref("nginx:1.7.9")],
        [cache("imc-a", (NGINX, 2 * MB), (APP, 3 * MB), ("docker.io/library/busybox:1", 7 * MB))],
        NOW,
        perfect_match=False,
        match_count_request=None,
    )
    assert result.winner is not None
    assert result.winner.matched == (APP, NGINX)
    assert result.winner.matched_bytes == 5 * MB
    assert result.winner.degree == 2


def test_exclusions_are_counted_by_reason() -> None:
    result = rank_caches(
        [ref("nginx:1.7.9"), ref("redis:7")],
        [
            cache("imc-expired", (NGINX, MB), expires_in_hours=-1),
            cache("imc-small", (NGINX, 25 * GIB)),
            cache("imc-partial", (NGINX, MB)),
            cache("imc-unrelated", ("docker.io/library/busybox:1", MB)),
        ],
        NOW,
        perfect_match=True,
        match_count_request=None,
    )
    assert result.winner is None
    assert (result.exclusions.expired, result.exclusions.too_small, result.exclusions.below_request) == (1, 1, 1)
    assert result.explanation == (
        "no cache qualified: of the Ready caches holding some of the Pod's 2 image(s), 1 expired, "
        "1 too small for the Pod's images, 1 matched too few images (perfect match required: all 2)"
    )


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (999, "999 B"), (1500, "1.5 kB"), (386 * MB, "386 MB"), (9_960_000, "10.0 MB"), (2 * GIB, "2.1 GB")],
)
def test_format_bytes(size: int, text: str) -> None:
    assert format_bytes(size) == text


# Property: the fast path agrees with a brute-force application of the written policy.

_POOL_REFS = [
    NGINX,
    f"{NGINX}@{DIGEST_A}",
    "docker.io/library/nginx:1.7.10",
    f"docker.io/library/nginx@{DIGEST_B}",
    REDIS,
    APP,
    "localhost:5000/x:latest",
]
_WANTED = ["nginx:1.7.9", "nginx@" + DIGEST_A, "nginx:1.7.9@" + DIGEST_B, "redis:7", APP, "localhost:5000/x", "busybox"]

_cached_images = st.builds(
    CachedImage,
    reference=st.sampled_from(_POOL_REFS),
    size=st.integers(0, 3).map(lambda n: n * 10 * GIB // 4),
    digest=st.sampled_from(["", DIGEST_A, DIGEST_B]),
)
_caches = st.builds(
    cache,
    st.from_regex(r"imc-[a-z]{1,3}", fullmatch=True),
    phase=st.sampled_from([CachePhase.READY, CachePhase.READY, CachePhase.CREATING]),
    size_gib=st.sampled_from([1, 5, 20]),
    age_hours=st.integers(0, 3),
    expires_in_hours=st.none() | st.integers(-1, 1),
).flatmap(lambda base: st.lists(_cached_images, max_size=4).map(lambda images: replace(base, images=tuple(images))))


def _brute_force_winner(
    wanted: Sequence[ImageRef], caches: Sequence[ImageCache], perfect: bool, count: int | None
) -> tuple[int, int, timedelta, str] | None:
    distinct = list({item.normalized: item for item in wanted}.values())
    required = len(distinct) if perfect else max(1, min(count or 1, len(distinct)))
    best = None
    for candidate in caches:
        if candidate.phase is not CachePhase.READY or candidate.is_expired(NOW):
            continue
        held = [w for w in distinct if any(matches(image, w) for image in candidate.images)]
        used: dict[str, int] = {}
        for image in candidate.images:
            if any(matches(image, w) for w in distinct):
                used[image.reference] = max(image.size, used.get(image.reference, 0))
        matched_bytes = sum(used.values())
        if not held or len(held) < required or candidate.size_gib * GIB < matched_bytes:
            continue
        key = (-len(held), -matched_bytes, NOW - candidate.created_at, candidate.imc_id)
        best = key if best is None or key < best else best
    return best


@settings(max_examples=300)
@given(
    st.lists(st.sampled_from(_WANTED), min_size=1, max_size=4),
    st.lists(_caches, max_size=8),
    st.booleans(),
    st.none() | st.integers(1, 4),
)
def test_fast_ranking_agrees_with_brute_force(
    wanted_texts: list[str], caches: list[ImageCache], perfect: bool, count: int | None
) -> None:
    wanted = [ref(text) for text in wanted_texts]
    expected = _brute_force_winner(wanted, caches, perfect, count)
    result = rank_caches(wanted, caches, NOW, perfect_match=perfect, match_count_request=count)
    if expected is None:
        assert result.winner is None
    else:
        assert result.winner is not None
        winner = result.winner
        got = (-winner.degree, -winner.matched_bytes, NOW - winner.cache.created_at, winner.cache.imc_id)
        assert got == expected


def test_duplicate_cache_ids_rank_without_error_and_keep_input_order() -> None:
    first = cache("imc-same", (NGINX, MB))
    second = replace(first, name="another")
    result = rank_caches([ref("nginx:1.7.9")], [first, second], NOW, perfect_match=False, match_count_request=None)
    assert result.winner is not None
    assert result.winner.cache.name == "imc-same"
    assert [candidate.cache.name for candidate in result.ranked] == ["imc-same", "another"]
