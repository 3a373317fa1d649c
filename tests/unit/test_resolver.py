"""Resolving a Pod's image-cache request: outcomes, Events, annotations, auto-create and sharing."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest

from vk_provider.domain.annotations import (
    AUTO_IMAGE_CACHE_SEED,
    AUTO_IMC,
    IMAGE_SNAPSHOT_ID_SEED,
    IMC_ID,
    INSTANCE_ID,
    MATCH_COUNT_REQUEST,
    MATCHED_IMAGE_CACHE,
    PERFECT_MATCH,
    instance_id_for,
)
from vk_provider.domain.model import CachedImage, CachePhase, ImageCache
from vk_provider.domain.resolver import (
    AutoCreateSpec,
    EventType,
    Outcome,
    PodCacheFacts,
    PodEvent,
    Resolution,
    auto_cache_id_for,
    resolve,
    resume,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MB = 10**6
UID = "0b5e3c1a-5d7e-4c55-9a3f-2f0c6f1b7d10"
INSTANCE = instance_id_for(UID)
NGINX = "docker.io/library/nginx:1.7.9"
REDIS = "docker.io/library/redis:7"
BUSYBOX = "docker.io/library/busybox:1.36"
READY_ID = "imc-2ze5tm5gehgtiigaaaaa"


def pod(
    images: tuple[str, ...] = ("nginx:1.7.9",), annotations: dict[str, str] | None = None, uid: str = UID
) -> PodCacheFacts:
    return PodCacheFacts(uid=uid, namespace="default", name="nginx", annotations=annotations or {}, images=images)


def cache(
    imc_id: str,
    *images: tuple[str, int],
    phase: CachePhase = CachePhase.READY,
    automatic: bool = False,
    age_hours: int = 1,
    expires_in_hours: int | None = None,
    size_gib: int = 20,
) -> ImageCache:
    return ImageCache(
        imc_id=imc_id,
        name=imc_id,
        phase=phase,
        size_gib=size_gib,
        images=tuple(CachedImage(reference, size) for reference, size in images),
        automatic=automatic,
        created_at=NOW - timedelta(hours=age_hours),
        expires_at=None if expires_in_hours is None else NOW + timedelta(hours=expires_in_hours),
    )


def failed_auto(images: tuple[tuple[str, int], ...], *, failed_minutes_ago: float = 1, message: str = "") -> ImageCache:
    """An automatic cache whose build failed that long ago (Failed caches expire 24 h after)."""
    failed_at = NOW - timedelta(minutes=failed_minutes_ago)
    return replace(
        cache("imc-failed", *images, phase=CachePhase.FAILED, automatic=True),
        expires_at=failed_at + timedelta(hours=24),
        message=message,
    )


def hit_event(imc_id: str) -> PodEvent:
    return PodEvent(
        "SuccessfulHitImageCache",
        EventType.NORMAL,
        f"[eci.imagecache]Successfully hit image cache {imc_id}, eci will be scheduled with this image cache.",
    )


MISSED = PodEvent("ImageCacheMissed", EventType.WARNING, "[eci.imagecache]Missed image cache.")
AUTO_ID = auto_cache_id_for(INSTANCE)


def auto_created(imc_id: str) -> PodEvent:
    return PodEvent("ImageCacheAutoCreated", EventType.NORMAL, f"[eci.imagecache]Image cache {imc_id} is auto created")


def not_found(imc_id: str) -> PodEvent:
    return PodEvent("ImageCacheNotFound", EventType.WARNING, f"The specified image cache {imc_id} does not exist.")


def not_complete(imc_id: str) -> PodEvent:
    return PodEvent(
        "ImageCacheNotComplete",
        EventType.NORMAL,
        f"The production for specified image cache {imc_id} is not yet complete.",
    )


def problem(message: str) -> PodEvent:
    return PodEvent("InvalidImageCacheAnnotation", EventType.WARNING, message)


READY_NGINX = cache(READY_ID, (NGINX, 386 * MB))


@dataclass(frozen=True)
class Case:
    id: str
    pod: PodCacheFacts
    caches: tuple[ImageCache, ...]
    outcome: Outcome
    events: tuple[PodEvent, ...]
    cache_id: str | None = None
    covered: tuple[str, ...] = ()
    to_pull: tuple[str, ...] = ()
    written: dict[str, str] = field(default_factory=lambda: {INSTANCE_ID: INSTANCE})
    default_auto: bool = False


CASES = [
    # --- the seed's four examples (Deployment template and Pod, automatic and explicit)
    Case(
        "seed: automatic, a Ready cache holds nginx",
        pod(annotations={AUTO_IMAGE_CACHE_SEED: "true"}),
        (READY_NGINX,),
        Outcome.AUTO_HIT,
        (hit_event(READY_ID),),
        cache_id=READY_ID,
        covered=(NGINX,),
        written={INSTANCE_ID: INSTANCE, MATCHED_IMAGE_CACHE: READY_ID},
    ),
    Case(
        "seed: automatic, no cache yet",
        pod(annotations={AUTO_IMAGE_CACHE_SEED: "true"}),
        (),
        Outcome.MISS,
        (MISSED, auto_created(AUTO_ID)),
        to_pull=(NGINX,),
    ),
    Case(
        "seed: explicit, the masked id of the document",
        pod(annotations={IMAGE_SNAPSHOT_ID_SEED: "imc-2ze5tm5gehgtiiga****"}),
        (READY_NGINX,),
        Outcome.FAILED_NOT_FOUND,
        (
            problem(
                f'annotation {IMAGE_SNAPSHOT_ID_SEED}="imc-2ze5tm5gehgtiiga****" is not an image cache id '
                "(imc- followed by lowercase letters and digits); no cache can match it"
            ),
            not_found("imc-2ze5tm5gehgtiiga****"),
        ),
        to_pull=(NGINX,),
        written={},
    ),
    Case(
        "seed: explicit, Ready",
        pod(annotations={IMAGE_SNAPSHOT_ID_SEED: READY_ID}),
        (READY_NGINX,),
        Outcome.EXPLICIT_HIT,
        (hit_event(READY_ID),),
        cache_id=READY_ID,
        covered=(NGINX,),
        written={INSTANCE_ID: INSTANCE, MATCHED_IMAGE_CACHE: READY_ID},
    ),
    # --- switches
    Case("no annotations, default off", pod(), (READY_NGINX,), Outcome.NO_CACHE, (), to_pull=(NGINX,)),
    Case(
        "no annotations, default on",
        pod(),
        (READY_NGINX,),
        Outcome.AUTO_HIT,
        (hit_event(READY_ID),),
        cache_id=READY_ID,
        covered=(NGINX,),
        written={INSTANCE_ID: INSTANCE, MATCHED_IMAGE_CACHE: READY_ID},
        default_auto=True,
    ),
    Case(
        "newer key switches automatic off against the default",
        pod(annotations={AUTO_IMC: "false"}),
        (READY_NGINX,),
        Outcome.NO_CACHE,
        (),
        to_pull=(NGINX,),
        default_auto=True,
    ),
    Case(
        "conflicting generations: the newer key wins, with a warning",
        pod(annotations={AUTO_IMAGE_CACHE_SEED: "true", AUTO_IMC: "false"}),
        (READY_NGINX,),
        Outcome.NO_CACHE,
        (problem(f'annotations {AUTO_IMAGE_CACHE_SEED}="true" and {AUTO_IMC}="false" disagree; using {AUTO_IMC}'),),
        to_pull=(NGINX,),
    ),
    Case(
        "a bad match count is reported and ignored",
        pod(annotations={AUTO_IMC: "true", MATCH_COUNT_REQUEST: "abc"}),
        (READY_NGINX,),
        Outcome.AUTO_HIT,
        (
            problem(f'annotation {MATCH_COUNT_REQUEST}="abc" is not a whole number; ignored'),
            hit_event(READY_ID),
        ),
        cache_id=READY_ID,
        covered=(NGINX,),
        written={INSTANCE_ID: INSTANCE, MATCHED_IMAGE_CACHE: READY_ID},
    ),
    # --- explicit
    Case(
        "explicit beats automatic",
        pod(("nginx:1.7.9", "redis:7"), annotations={AUTO_IMC: "true", IMC_ID: READY_ID}),
        (READY_NGINX, cache("imc-both", (NGINX, MB), (REDIS, MB))),
        Outcome.EXPLICIT_HIT,
        (hit_event(READY_ID),),
        cache_id=READY_ID,
        covered=(NGINX,),
        to_pull=(REDIS,),
        written={INSTANCE_ID: INSTANCE, MATCHED_IMAGE_CACHE: READY_ID},
    ),
    Case(
        "explicit partial hit: the rest is pulled",
        pod(("busybox:1.36", "nginx:1.7.9", "redis:7"), annotations={IMC_ID: "imc-both"}),
        (cache("imc-both", (NGINX, MB), (REDIS, MB)),),
        Outcome.EXPLICIT_HIT,
        (hit_event("imc-both"),),
        cache_id="imc-both",
        covered=(NGINX, REDIS),
        to_pull=(BUSYBOX,),
        written={INSTANCE_ID: INSTANCE, MATCHED_IMAGE_CACHE: "imc-both"},
    ),
    Case(
        "explicit hit holding none of the images is still a hit",
        pod(annotations={IMC_ID: "imc-redis"}),
        (cache("imc-redis", (REDIS, MB)),),
        Outcome.EXPLICIT_HIT,
        (hit_event("imc-redis"),),
        cache_id="imc-redis",
        to_pull=(NGINX,),
        written={INSTANCE_ID: INSTANCE, MATCHED_IMAGE_CACHE: "imc-redis"},
    ),
    Case(
        "explicit id unknown: fails, no automatic fallback",
        pod(annotations={IMC_ID: "imc-unknown", AUTO_IMC: "true"}),
        (READY_NGINX,),
        Outcome.FAILED_NOT_FOUND,
        (not_found("imc-unknown"),),
        to_pull=(NGINX,),
        written={},
    ),
    Case(
        "explicit id expired counts as not found",
        pod(annotations={IMC_ID: "imc-old"}),
        (cache("imc-old", (NGINX, MB), expires_in_hours=-1),),
        Outcome.FAILED_NOT_FOUND,
        (not_found("imc-old"),),
        cache_id="imc-old",
        to_pull=(NGINX,),
        written={},
    ),
    *(
        Case(
            f"explicit id {phase}: not complete",
            pod(annotations={IMC_ID: "imc-building"}),
            (cache("imc-building", (NGINX, MB), phase=phase),),
            Outcome.FAILED_NOT_COMPLETE,
            (not_complete("imc-building"),),
            cache_id="imc-building",
            to_pull=(NGINX,),
            written={},
        )
        for phase in CachePhase
        if phase is not CachePhase.READY
    ),
    Case(
        "two explicit ids: the newer key wins",
        pod(annotations={IMC_ID: READY_ID, IMAGE_SNAPSHOT_ID_SEED: "imc-other"}),
        (READY_NGINX, cache("imc-other", (NGINX, MB))),
        Outcome.EXPLICIT_HIT,
        (
            problem(
                f'annotations {IMAGE_SNAPSHOT_ID_SEED}="imc-other" and {IMC_ID}="{READY_ID}" '
                f"name different image caches; using {IMC_ID}"
            ),
            hit_event(READY_ID),
        ),
        cache_id=READY_ID,
        covered=(NGINX,),
        written={INSTANCE_ID: INSTANCE, MATCHED_IMAGE_CACHE: READY_ID},
    ),
    # --- automatic
    Case(
        "automatic picks the best cache and covers what it holds",
        pod(("nginx:1.7.9", "redis:7", "busybox:1.36"), annotations={AUTO_IMC: "true"}),
        (READY_NGINX, cache("imc-two", (NGINX, MB), (REDIS, MB))),
        Outcome.AUTO_HIT,
        (hit_event("imc-two"),),
        cache_id="imc-two",
        covered=(NGINX, REDIS),
        to_pull=(BUSYBOX,),
        written={INSTANCE_ID: INSTANCE, MATCHED_IMAGE_CACHE: "imc-two"},
    ),
    Case(
        "perfect match turns a partial hit into a miss",
        pod(("nginx:1.7.9", "redis:7"), annotations={AUTO_IMC: "true", PERFECT_MATCH: "true"}),
        (READY_NGINX,),
        Outcome.MISS,
        (MISSED, auto_created(AUTO_ID)),
        to_pull=(NGINX, REDIS),
    ),
    Case(
        "match count request satisfied",
        pod(("nginx:1.7.9", "redis:7", "busybox:1.36"), annotations={AUTO_IMC: "true", MATCH_COUNT_REQUEST: "2"}),
        (READY_NGINX, cache("imc-two", (NGINX, MB), (BUSYBOX, MB), age_hours=50)),
        Outcome.AUTO_HIT,
        (hit_event("imc-two"),),
        cache_id="imc-two",
        covered=(NGINX, BUSYBOX),
        to_pull=(REDIS,),
        written={INSTANCE_ID: INSTANCE, MATCHED_IMAGE_CACHE: "imc-two"},
    ),
    Case(
        "a match count request above the Pod's images asks for all of them, and says so",
        pod(("nginx:1.7.9", "redis:7"), annotations={AUTO_IMC: "true", MATCH_COUNT_REQUEST: "5"}),
        (READY_NGINX, cache("imc-both", (NGINX, MB), (REDIS, MB), age_hours=50)),
        Outcome.AUTO_HIT,
        (
            problem(
                f'annotation {MATCH_COUNT_REQUEST}="5" is more than the Pod\'s 2 images; every one must be in the cache'
            ),
            hit_event("imc-both"),
        ),
        cache_id="imc-both",
        covered=(NGINX, REDIS),
        to_pull=(),
        written={INSTANCE_ID: INSTANCE, MATCHED_IMAGE_CACHE: "imc-both"},
    ),
    Case(
        "a match count request counts an invalid image among the Pod's images",
        pod(("nginx:1.7.9", "Bad Image!"), annotations={AUTO_IMC: "true", MATCH_COUNT_REQUEST: "3"}),
        (READY_NGINX,),
        Outcome.AUTO_HIT,
        (
            problem(
                f'annotation {MATCH_COUNT_REQUEST}="3" is more than the Pod\'s 2 images; every one must be in the cache'
            ),
            hit_event(READY_NGINX.imc_id),
        ),
        cache_id=READY_NGINX.imc_id,
        covered=(NGINX,),
        to_pull=(),
        written={INSTANCE_ID: INSTANCE, MATCHED_IMAGE_CACHE: READY_NGINX.imc_id},
    ),
    Case(
        "expired and not-Ready caches never hit",
        pod(annotations={AUTO_IMC: "true"}),
        (
            cache("imc-expired", (NGINX, MB), expires_in_hours=-2),
            cache("imc-failed", (NGINX, MB), phase=CachePhase.FAILED),
            cache("imc-updating", (NGINX, MB), (REDIS, MB), phase=CachePhase.UPDATING),
        ),
        Outcome.MISS,
        (MISSED, auto_created(AUTO_ID)),
        to_pull=(NGINX,),
    ),
    Case(
        "no automatic copy of a cache of the same images someone is building",
        pod(annotations={AUTO_IMC: "true"}),
        (cache("imc-building", (NGINX, MB), phase=CachePhase.CREATING),),
        Outcome.MISS,
        (MISSED,),
        to_pull=(NGINX,),
    ),
    Case(
        "no automatic cache while one of the same images has failed to build",
        pod(("redis:7", "nginx:1.7.9"), annotations={AUTO_IMC: "true"}),
        (failed_auto(((NGINX, MB), (REDIS, MB))),),
        Outcome.MISS,
        (MISSED,),
        to_pull=(REDIS, NGINX),
    ),
    Case(
        "a miss shares the automatic cache being built with the same images",
        pod(("redis:7", "nginx:1.7.9", "docker.io/library/nginx:1.7.9"), annotations={AUTO_IMC: "true"}),
        (
            cache("imc-later", (REDIS, MB), (NGINX, MB), phase=CachePhase.PREPARING, automatic=True, age_hours=1),
            cache("imc-first", (NGINX, MB), (REDIS, MB), phase=CachePhase.CREATING, automatic=True, age_hours=2),
        ),
        Outcome.MISS,
        (MISSED, auto_created("imc-first")),
        to_pull=(REDIS, NGINX),
    ),
]


def _run(case: Case) -> Resolution:
    return resolve(case.pod, case.caches, NOW, default_auto=case.default_auto)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_resolve(case: Case) -> None:
    resolution = _run(case)
    assert resolution.outcome is case.outcome
    assert resolution.events == case.events
    assert all(event.source_component == "EciService" for event in resolution.events)
    assert (resolution.cache.imc_id if resolution.cache else None) == case.cache_id
    assert resolution.covered_images == case.covered
    assert resolution.images_to_pull == case.to_pull
    assert dict(resolution.annotations) == case.written
    assert resolution.instance_id == INSTANCE
    assert resolution.explanation
    assert resolution.failure_reason == (case.outcome.value if case.outcome.is_failure else None)


def test_a_failed_automatic_cache_stops_more_of_the_same_for_five_minutes() -> None:
    facts = pod(("nginx:1.7.9",), annotations={AUTO_IMC: "true"})
    failed = failed_auto(((NGINX, MB),), failed_minutes_ago=4, message="the images need 41 GiB; the cache holds 30 GiB")
    resolution = resolve(facts, [failed], NOW, default_auto=False)
    assert resolution.auto_create is None
    assert resolution.shared_with is None
    assert "imc-failed" in resolution.explanation
    assert "failed to build 240 s ago (the images need 41 GiB" in resolution.explanation
    assert "5 minutes after that failure (or once it is deleted)" in resolution.explanation
    # Five minutes after the failure (a registry error of a moment may be over), once it is
    # deleted, or for another image set, a cache is created again.
    assert resolve(facts, [failed_auto(((NGINX, MB),), failed_minutes_ago=5)], NOW, default_auto=False).auto_create
    assert resolve(facts, [], NOW, default_auto=False).auto_create
    other = failed_auto(((NGINX, MB), (REDIS, MB)))
    assert resolve(facts, [other], NOW, default_auto=False).auto_create


def test_a_cache_refused_for_the_quota_does_not_stop_the_next_automatic_one() -> None:
    facts = pod(("nginx:1.7.9",), annotations={AUTO_IMC: "true"})
    refused = failed_auto(((NGINX, MB),), message="QuotaFull: the quota of 100 automatic image caches is used up")
    resolution = resolve(facts, [refused], NOW, default_auto=False)
    assert resolution.auto_create is not None
    assert resolution.auto_create.images == (NGINX,)


def test_auto_create_spec_on_a_miss() -> None:
    facts = pod(("busybox:1.36", "redis:7", "docker.io/library/redis:7"), annotations={AUTO_IMC: "true"})
    resolution = resolve(facts, [READY_NGINX], NOW, default_auto=False)
    assert resolution.auto_create == AutoCreateSpec(
        name=f"auto-create-for-{INSTANCE}",
        imc_id=AUTO_ID,
        images=(BUSYBOX, REDIS),
        size_gib=30,
        automatic=True,
    )
    assert re.fullmatch(r"imc-[a-z0-9]{20}", AUTO_ID)
    assert resolution.shared_with is None
    assert "creating auto-create-for-" in resolution.explanation


@pytest.mark.parametrize(
    "building",
    [
        pytest.param(cache("imc-x", (NGINX, MB), phase=CachePhase.FAILED), id="failed-manual"),
        pytest.param(cache("imc-x", (NGINX, MB), phase=CachePhase.UPDATE_FAILED, automatic=True), id="update-failed"),
        pytest.param(
            cache("imc-x", (NGINX, MB), phase=CachePhase.CREATING, automatic=True, expires_in_hours=-1), id="expired"
        ),
        pytest.param(
            cache("imc-x", (NGINX, MB), (REDIS, MB), phase=CachePhase.CREATING, automatic=False), id="manual-superset"
        ),
        pytest.param(
            cache("imc-x", (NGINX, MB), (REDIS, MB), phase=CachePhase.CREATING, automatic=True), id="superset"
        ),
        pytest.param(
            cache("imc-x", ("docker.io/library/nginx:1.7.10", MB), phase=CachePhase.CREATING, automatic=True),
            id="other-tag",
        ),
    ],
)
def test_a_miss_does_not_share_an_unsuitable_cache(building: ImageCache) -> None:
    resolution = resolve(pod(annotations={AUTO_IMC: "true"}), [building], NOW, default_auto=False)
    assert resolution.outcome is Outcome.MISS
    assert resolution.shared_with is None
    assert resolution.auto_create is not None


def test_a_burst_of_identical_misses_makes_one_cache() -> None:
    caches: list[ImageCache] = []
    created: list[AutoCreateSpec] = []
    shared: set[str] = set()
    for number in range(50):
        facts = pod(("nginx:1.7.9", "redis:7"), uid=f"uid-{number}", annotations={AUTO_IMC: "true"})
        resolution = resolve(facts, caches, NOW, default_auto=False)
        assert resolution.outcome is Outcome.MISS
        if resolution.auto_create is not None:
            spec = resolution.auto_create
            created.append(spec)
            # What the caller does: make the new cache visible to the next decision.
            caches.append(
                ImageCache(
                    imc_id=spec.imc_id,
                    name=spec.name,
                    phase=CachePhase.PREPARING,
                    size_gib=spec.size_gib,
                    images=tuple(CachedImage(reference, 0) for reference in spec.images),
                    automatic=spec.automatic,
                    created_at=NOW,
                )
            )
        else:
            assert resolution.shared_with is not None
            shared.add(resolution.shared_with.imc_id)
            assert resolution.events[-1] == auto_created(resolution.shared_with.imc_id)
    assert len(created) == 1
    assert shared == {created[0].imc_id}

    # Once it is Ready, the same Pods hit it.
    caches[0] = replace(caches[0], phase=CachePhase.READY)
    resolution = resolve(
        pod(("redis:7", "nginx:1.7.9"), annotations={AUTO_IMC: "true"}), caches, NOW, default_auto=False
    )
    assert resolution.outcome is Outcome.AUTO_HIT
    assert resolution.cache == caches[0]


def test_invalid_pod_images_are_reported_and_never_match() -> None:
    resolution = resolve(
        pod(("nginx:1.7.9", "Not Valid", "Nginx:1"), annotations={AUTO_IMC: "true"}),
        [READY_NGINX],
        NOW,
        default_auto=False,
    )
    assert resolution.outcome is Outcome.AUTO_HIT
    assert [invalid.text for invalid in resolution.invalid_images] == ["Not Valid", "Nginx:1"]
    assert resolution.covered_images == (NGINX,)
    assert resolution.images_to_pull == ()


@pytest.mark.parametrize(
    ("images", "reason"),
    [
        (("Not Valid",), "no valid images"),
        ((), "no valid images"),
        (tuple(f"app{number}:1" for number in range(21)), "21 images exceed the 20"),
    ],
)
def test_misses_that_cannot_auto_create(images: tuple[str, ...], reason: str) -> None:
    resolution = resolve(pod(images, annotations={AUTO_IMC: "true"}), [READY_NGINX], NOW, default_auto=False)
    assert resolution.outcome is Outcome.MISS
    assert resolution.auto_create is None
    assert resolution.shared_with is None
    assert resolution.events == (MISSED,)
    assert reason in resolution.explanation


def test_image_sizes_make_the_size_check_stricter() -> None:
    facts = pod(("nginx:1.7.9", "redis:7"), annotations={AUTO_IMC: "true"})
    small = cache("imc-small", (NGINX, 10 * 2**30), size_gib=20)
    assert resolve(facts, [small], NOW, default_auto=False).outcome is Outcome.AUTO_HIT
    strict = resolve(facts, [small], NOW, default_auto=False, image_sizes={REDIS: 11 * 2**30})
    assert strict.outcome is Outcome.MISS
    assert strict.match is not None
    assert strict.match.exclusions.too_small == 1


def test_auto_hit_explanation_says_why() -> None:
    resolution = resolve(
        pod(("nginx:1.7.9", "redis:7"), annotations={AUTO_IMC: "true"}),
        [READY_NGINX, cache("imc-both", (NGINX, 200 * MB), (REDIS, 186 * MB))],
        NOW,
        default_auto=False,
    )
    assert resolution.explanation == f"imc-both matched 2/2 images (386 MB); beat {READY_ID} on match degree (1/2)"


# ------------------------------------------------------------------ taken again after a restart


def test_resume_reads_back_a_hit_without_events_or_writes() -> None:
    images = ("nginx:1.7.9", "redis:7")
    first = resolve(pod(images, {AUTO_IMC: "true"}), [READY_NGINX], NOW, default_auto=False)
    assert first.outcome is Outcome.AUTO_HIT
    # What the node wrote with the Pod's status, as the next agent run finds it.
    again = resume(pod(images, {AUTO_IMC: "true", **first.annotations}), [READY_NGINX], default_auto=False)
    assert again is not None
    assert again.outcome is Outcome.AUTO_HIT
    assert again.cache == READY_NGINX
    assert again.covered_images == first.covered_images == (NGINX,)
    assert again.images_to_pull == (REDIS,)
    assert again.events == ()
    assert dict(again.annotations) == {}
    assert again.auto_create is None
    assert f"matched {READY_ID}" in again.explanation


def test_resume_of_an_explicit_hit_whose_cache_is_gone_pulls_everything() -> None:
    written = {IMAGE_SNAPSHOT_ID_SEED: READY_ID, INSTANCE_ID: INSTANCE, MATCHED_IMAGE_CACHE: READY_ID}
    again = resume(pod(annotations=written), [], default_auto=False)
    assert again is not None
    assert again.outcome is Outcome.EXPLICIT_HIT
    assert again.cache is None
    assert again.covered_images == ()
    assert again.images_to_pull == (NGINX,)
    assert again.matched_id == READY_ID  # recorded as the cache it used
    assert "gone" in again.explanation


@pytest.mark.parametrize(
    ("annotations", "outcome"),
    [({AUTO_IMC: "true"}, Outcome.MISS), ({}, Outcome.NO_CACHE), ({AUTO_IMC: "false"}, Outcome.NO_CACHE)],
)
def test_resume_of_a_miss_or_no_cache_creates_nothing(annotations: dict[str, str], outcome: Outcome) -> None:
    again = resume(pod(annotations={**annotations, INSTANCE_ID: INSTANCE}), [], default_auto=False)
    assert again is not None
    assert again.outcome is outcome
    assert again.auto_create is None
    assert again.events == ()
    assert again.images_to_pull == (NGINX,)


def test_no_resume_for_a_pod_never_resolved_or_with_another_pods_annotations() -> None:
    assert resume(pod(annotations={AUTO_IMC: "true"}), [READY_NGINX], default_auto=False) is None
    copied = {INSTANCE_ID: instance_id_for("another-uid"), MATCHED_IMAGE_CACHE: READY_ID}
    assert resume(pod(annotations=copied), [READY_NGINX], default_auto=False) is None
