"""Pure ImageCache decisions: ids, spec validation, changes, builds, progress, lifetimes, quotas, status."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vk_provider.domain import cachebuild as cb
from vk_provider.domain.cachebuild import CacheSpec, ChangeKind
from vk_provider.domain.images import InvalidReference
from vk_provider.domain.model import CachedImage, CachePhase, ImageCache, ImageManifest, Layer
from vk_provider.domain.records import CacheEvent

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NGINX = "docker.io/library/nginx:1.7.9"
BUSYBOX = "docker.io/library/busybox:latest"


def cache(
    name: str = "c",
    *refs: str,
    phase: CachePhase = CachePhase.READY,
    automatic: bool = False,
    created_hours_ago: float = 10,
    matched_hours_ago: float | None = None,
    expires_at: datetime | None = None,
) -> ImageCache:
    return ImageCache(
        imc_id=f"imc-{name:a<20}"[:24],
        name=name,
        phase=phase,
        size_gib=20,
        images=tuple(CachedImage(ref, 1000) for ref in (refs or (NGINX,))),
        automatic=automatic,
        created_at=NOW - timedelta(hours=created_hours_ago),
        last_matched_at=None if matched_hours_ago is None else NOW - timedelta(hours=matched_hours_ago),
        expires_at=expires_at,
    )


def manifest(reference: str, *layers: tuple[str, int, int]) -> ImageManifest:
    return ImageManifest(reference, "sha256:" + "0" * 64, tuple(Layer(d, s, u) for d, s, u in layers))


# ------------------------------------------------------------------ ids


def test_new_ids_look_like_eci_ids_and_follow_the_generator() -> None:
    first = cb.new_imc_id(random.Random(7))
    assert cb.is_imc_id(first)
    assert len(first) == 24
    assert first == cb.new_imc_id(random.Random(7))
    assert first != cb.new_imc_id(random.Random(8))


@given(st.integers())
def test_every_generated_id_is_well_formed(seed: int) -> None:
    assert cb.is_imc_id(cb.new_imc_id(random.Random(seed)))


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("imc-2ze5tm5gehgtiiga0000", True),
        ("imc-2ze5tm5gehgtiiga000", False),
        ("imc-2ZE5TM5GEHGTIIGA0000", False),
        ("eci-2ze5tm5gehgtiiga0000", False),
        ("", False),
    ],
)
def test_is_imc_id(text: str, ok: bool) -> None:
    assert cb.is_imc_id(text) is ok


# ------------------------------------------------------------------ spec


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"images": ["nginx:1.7.9"]}, None),
        ({"images": ["nginx:1.7.9"], "imageCacheSize": 20, "retentionDays": 1}, None),
        ({"images": ["a"] * 20, "imageCacheSize": 32768, "retentionDays": 65536}, None),
        ({"images": []}, "1 to 20 images"),
        ({"images": ["a"] * 21}, "1 to 20 images"),
        ({}, "spec.images must be a list"),
        ({"images": ["nginx", 3]}, "spec.images must be a list"),
        ({"images": ["a"], "imageCacheSize": 10}, "imageCacheSize"),
        ({"images": ["a"], "imageCacheSize": 32769}, "imageCacheSize"),
        ({"images": ["a"], "imageCacheSize": True}, "imageCacheSize"),
        ({"images": ["a"], "retentionDays": 0}, "retentionDays"),
        ({"images": ["a"], "retentionDays": 65537}, "retentionDays"),
        ({"images": ["a"], "imagePullSecrets": ["nocolon"]}, "imagePullSecrets"),
    ],
)
def test_spec_validation_mirrors_the_crd(spec: dict[str, Any], problem: str | None) -> None:
    parsed = cb.parse_spec(spec)
    if problem is None:
        assert parsed.problems == ()
    else:
        assert any(problem in p for p in parsed.problems), parsed.problems


def test_spec_defaults_marks_and_references() -> None:
    parsed = cb.parse_spec(
        {"images": ["nginx:1.7.9", "busybox"], "imagePullSecrets": ["ns:secret"]},
        labels={cb.AUTOMATIC_LABEL: "true"},
        annotations={cb.ID_ANNOTATION: "imc-2ze5tm5gehgtiiga0000"},
    )
    assert parsed.size_gib == 20
    assert parsed.retention_days is None
    assert parsed.automatic
    assert parsed.requested_id == "imc-2ze5tm5gehgtiiga0000"
    assert parsed.pull_secrets == ("ns:secret",)
    assert parsed.references == (NGINX, BUSYBOX)
    assert cb.parse_spec({"images": ["a"]}, annotations={cb.ID_ANNOTATION: "bogus"}).requested_id == ""


def test_auto_cache_body_round_trips_through_parse_spec() -> None:
    body = cb.auto_cache_body("auto-create-for-eci-x", "imc-2ze5tm5gehgtiiga0000", [NGINX], 30, "ns/pod")
    meta = body["metadata"]
    parsed = cb.parse_spec(body["spec"], meta["labels"], meta["annotations"])
    assert parsed == CacheSpec(images=(NGINX,), size_gib=30, automatic=True, requested_id="imc-2ze5tm5gehgtiiga0000")


# ------------------------------------------------------------------ changes

READY, CREATING, PREPARING = CachePhase.READY, CachePhase.CREATING, CachePhase.PREPARING
FAILED, UPDATING, UPDATE_FAILED = CachePhase.FAILED, CachePhase.UPDATING, CachePhase.UPDATE_FAILED
SAME = (NGINX,)
OTHER = (NGINX, BUSYBOX)


@pytest.mark.parametrize(
    ("phase", "images", "building", "refused", "kind", "is_refused"),
    [
        (READY, SAME, False, None, ChangeKind.NONE, False),
        (CREATING, SAME, True, None, ChangeKind.NONE, False),
        (CREATING, SAME, False, None, ChangeKind.RESUME, False),
        (PREPARING, SAME, False, None, ChangeKind.RESUME, False),
        (UPDATING, SAME, False, None, ChangeKind.RESUME, False),
        (READY, OTHER, False, None, ChangeKind.UPDATE, False),
        (UPDATE_FAILED, OTHER, False, None, ChangeKind.UPDATE, False),
        (FAILED, OTHER, False, None, ChangeKind.NONE, True),
        (CREATING, OTHER, True, None, ChangeKind.NONE, True),
        (CREATING, OTHER, False, None, ChangeKind.RESUME, True),
        (READY, OTHER, False, OTHER, ChangeKind.NONE, True),
        (READY, OTHER, False, (BUSYBOX,), ChangeKind.UPDATE, False),
        (READY, SAME, False, OTHER, ChangeKind.NONE, False),
    ],
)
def test_what_a_change_of_the_object_means(
    phase: CachePhase,
    images: tuple[str, ...],
    building: bool,
    refused: tuple[str, ...] | None,
    kind: ChangeKind,
    is_refused: bool,
) -> None:
    change = cb.plan_change(cache("c", NGINX, phase=phase), CacheSpec(images), building=building, refused=refused)
    assert change == cb.Change(kind, is_refused)


def test_the_same_images_in_another_order_are_no_change() -> None:
    current = cache("c", NGINX, BUSYBOX)
    assert cb.plan_change(current, CacheSpec((BUSYBOX, NGINX)), building=False) == cb.Change(ChangeKind.NONE, False)
    assert cb.plan_change(current, CacheSpec((BUSYBOX,)), building=False).kind is ChangeKind.UPDATE


def test_an_image_listed_twice_is_one_image_and_no_change() -> None:
    # The registry keeps each image of a cache once: the spec is read the same way, or every
    # event of the object (a label, a re-list, its own status) looked like a change and rebuilt it.
    spec = cb.parse_spec({"images": ["redis:7", "busybox", "docker.io/library/redis:7", "busybox", "nginx:1.7.9"]})
    assert spec.images == ("redis:7", "busybox", "nginx:1.7.9")  # each once, as first written, in order
    assert spec.references == ("docker.io/library/redis:7", BUSYBOX, NGINX)
    assert spec.problems == ()
    current = cache("c", "docker.io/library/redis:7", BUSYBOX, NGINX)
    assert cb.plan_change(current, spec, building=False) == cb.Change(ChangeKind.NONE, False)
    # The CRD's limit is on the list as written.
    assert cb.parse_spec({"images": ["busybox"] * (cb.MAX_IMAGES + 1)}).problems


def test_a_new_object_is_created() -> None:
    assert cb.plan_change(None, CacheSpec(SAME), building=False).kind is ChangeKind.CREATE


def test_refusal_message_names_the_phase() -> None:
    message = cb.refusal_message(CREATING)
    assert message.startswith(cb.REFUSAL_PREFIX)
    assert "Creating" in message


# ------------------------------------------------------------------ builds


def test_check_build_accepts_images_that_fit_counting_shared_layers_once() -> None:
    gib = cb.GIB
    nginx = manifest(NGINX, ("base", 4 * gib, 12 * gib), ("nginx", 1, 2))
    busybox = manifest(BUSYBOX, ("base", 4 * gib, 12 * gib))
    check = cb.check_build(CacheSpec(("nginx:1.7.9", "busybox")), {"nginx:1.7.9": nginx, "busybox": busybox}, 20)
    assert check.failure == ""
    assert check.manifests == (nginx, busybox)
    assert check.total_bytes == 4 * gib + 1
    assert check.uncompressed_bytes == 12 * gib + 2


@pytest.mark.parametrize(
    ("resolved", "size", "words"),
    [
        ({"x": None}, 20, "cannot be resolved: no such image"),
        ({"x": "401 Unauthorized"}, 20, "cannot be resolved: 401 Unauthorized"),
        ({"x": InvalidReference("x", "bad characters")}, 20, "cannot be resolved: bad characters"),
        ({"x": manifest("x", ("l", 1, 21 * cb.GIB))}, 20, "21.0 GiB, more than the cache's imageCacheSize of 20 GiB"),
    ],
)
def test_check_build_failures(resolved: dict[str, Any], size: int, words: str) -> None:
    assert words in cb.check_build(CacheSpec(("x",)), resolved, size).failure


def test_check_build_refuses_an_invalid_spec() -> None:
    assert cb.check_build(CacheSpec((), problems=("spec.images must",)), {}, 20).failure.startswith("invalid spec")


@pytest.mark.parametrize(
    ("done", "total", "percent"),
    [(0, 100, 0), (50, 100, 47), (100, 100, cb.PULL_SHARE), (150, 100, cb.PULL_SHARE), (0, 0, cb.PULL_SHARE)],
)
def test_build_progress(done: int, total: int, percent: int) -> None:
    assert cb.build_progress(done, total) == percent


@given(st.integers(min_value=1, max_value=10**12), st.data())
def test_build_progress_is_monotonic_and_below_done(total: int, data: st.DataObject) -> None:
    a = data.draw(st.integers(min_value=0, max_value=total))
    b = data.draw(st.integers(min_value=a, max_value=total))
    assert 0 <= cb.build_progress(a, total) <= cb.build_progress(b, total) <= cb.PULL_SHARE < 100


@pytest.mark.parametrize(("percent", "text"), [(0, "0%"), (42, "42%"), (100, "100%"), (150, "100%"), (-1, "0%")])
def test_progress_text_and_back(percent: int, text: str) -> None:
    assert cb.progress_text(percent) == text
    assert cb.parse_progress(text) == max(0, min(100, percent))


@pytest.mark.parametrize("text", [None, "", "abc", "12", "x%", "\u00b2%", "\uff11\uff12%"])
def test_parse_progress_of_junk_is_zero(text: object) -> None:
    assert cb.parse_progress(text) == 0


# ------------------------------------------------------------------ lifetimes


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (CacheSpec(SAME), None),
        (CacheSpec(SAME, retention_days=3), NOW + timedelta(days=3)),
        (CacheSpec(SAME, automatic=True), NOW + timedelta(days=7)),
        (CacheSpec(SAME, automatic=True, retention_days=1), NOW + timedelta(days=7)),
    ],
)
def test_expiry_when_created(spec: CacheSpec, expected: datetime | None) -> None:
    assert cb.expiry_when_created(NOW, spec) == expected


def test_expiry_when_failed_and_matched() -> None:
    assert cb.expiry_when_failed(NOW) == NOW + timedelta(hours=24)
    assert cb.expiry_when_matched(cache(automatic=True), NOW) == NOW + timedelta(days=30)
    manual = cache(expires_at=NOW + timedelta(days=2))
    assert cb.expiry_when_matched(manual, NOW) == NOW + timedelta(days=2)


def test_expired_lists_the_longest_expired_first() -> None:
    soon = cache("soon", expires_at=NOW - timedelta(minutes=1))
    long_ago = cache("old", expires_at=NOW - timedelta(days=1))
    exactly = cache("now", expires_at=NOW)
    keep = [cache("never"), cache("later", expires_at=NOW + timedelta(seconds=1))]
    assert cb.expired([soon, *keep, long_ago, exactly], NOW) == (long_ago, soon, exactly)


# ------------------------------------------------------------------ quotas


def test_under_quota_nothing_happens() -> None:
    assert cb.quota_decision([cache("a")], automatic=False, quota=2, lru=False) == cb.QuotaDecision()


def test_manual_at_quota_is_quota_full_without_lru() -> None:
    decision = cb.quota_decision([cache("a"), cache("b", automatic=True)], automatic=False, quota=1, lru=False)
    assert decision.refusal.startswith("QuotaFull")
    assert decision.evict == ()


def test_at_quota_lru_evicts_the_least_recently_used_of_the_same_kind() -> None:
    caches = [
        cache("used-recently", automatic=True, created_hours_ago=100, matched_hours_ago=1),
        cache("never-used-old", automatic=True, created_hours_ago=50),
        cache("used-long-ago", automatic=True, created_hours_ago=200, matched_hours_ago=60),
        cache("manual-ancient", created_hours_ago=1000),
    ]
    decision = cb.quota_decision(caches, automatic=True, quota=3, lru=True)
    assert [c.name for c in decision.evict] == ["used-long-ago"]
    decision = cb.quota_decision(caches, automatic=True, quota=2, lru=True)
    assert [c.name for c in decision.evict] == ["used-long-ago", "never-used-old"]


def test_lru_respects_keep_and_refuses_when_nothing_may_go() -> None:
    caches = [cache("a", automatic=True), cache("b", automatic=True, created_hours_ago=1)]
    decision = cb.quota_decision(caches, automatic=True, quota=2, lru=True, keep=frozenset({"a"}))
    assert [c.name for c in decision.evict] == ["b"]
    assert cb.quota_decision(caches, automatic=True, quota=0, lru=True, keep=frozenset({"a"})).refusal


def test_lru_never_evicts_a_cache_being_built_and_failed_caches_take_no_slot() -> None:
    caches = [
        cache("building", automatic=True, phase=CachePhase.CREATING, created_hours_ago=500),
        cache("updating", automatic=True, phase=CachePhase.UPDATING, created_hours_ago=400),
        cache("preparing", automatic=True, phase=CachePhase.PREPARING, created_hours_ago=300),
        cache("ready-old", automatic=True, created_hours_ago=200),
        cache("failed-new", automatic=True, phase=CachePhase.FAILED, created_hours_ago=1),
    ]
    assert cb.quota_decision(caches, automatic=True, quota=5, lru=True) == cb.QuotaDecision()
    decision = cb.quota_decision(caches, automatic=True, quota=4, lru=True)
    assert [c.name for c in decision.evict] == ["ready-old"]
    assert cb.quota_decision(caches, automatic=True, quota=3, lru=True).refusal.startswith("QuotaFull")


def test_a_manual_cache_refused_for_the_quota_does_not_keep_the_next_one_out() -> None:
    ready = [cache("a", created_hours_ago=3), cache("b", created_hours_ago=2)]
    refused = cache("c", phase=CachePhase.FAILED, created_hours_ago=1)
    assert cb.quota_decision([*ready, refused], automatic=False, quota=2, lru=False).refusal.startswith("QuotaFull")
    # One Ready cache deleted: the refused one does not hold the freed slot.
    assert cb.quota_decision([ready[1], refused], automatic=False, quota=2, lru=False) == cb.QuotaDecision()


# ------------------------------------------------------------------ status


def test_render_status_and_events() -> None:
    ready = cache("c", phase=READY, expires_at=NOW + timedelta(days=1))
    events = [CacheEvent("Normal", f"event {i}", 1, NOW, NOW) for i in range(60)]
    status = cb.render_status(ready, start_time=NOW - timedelta(hours=1), now=NOW, events=events)
    assert status["imageCacheId"] == ready.imc_id
    assert status["phase"] == "Ready"
    assert status["progress"] == "0%"
    assert status["startTime"] == "2026-03-01T11:00:00Z"
    assert status["lastUpdatedTime"] == "2026-03-01T12:00:00Z"
    assert status["expireDateTime"] == "2026-03-02T12:00:00Z"
    assert status["message"] is None
    assert len(status["events"]) == 50
    assert status["events"][0]["message"] == "event 10"
    assert status["events"][-1] == {
        "count": 1,
        "firstTimestamp": "2026-03-01T12:00:00Z",
        "lastTimestamp": "2026-03-01T12:00:00Z",
        "message": "event 59",
        "type": "Normal",
    }
    assert "events" not in cb.render_status(ready, start_time=NOW, now=NOW)
    assert cb.render_status(ready, start_time=NOW, now=NOW, message="why")["message"] == "why"


def test_status_differs_only_on_what_users_read() -> None:
    ready = cache("c", phase=READY)
    status = cb.render_status(ready, start_time=NOW, now=NOW)
    assert not cb.status_differs(status, ready, "")
    assert not cb.status_differs({**status, "lastUpdatedTime": "later"}, ready, "")
    assert cb.status_differs(status, ready, "refused")
    assert cb.status_differs({**status, "phase": "Creating"}, ready, "")
    assert cb.status_differs(None, ready, "")
    assert cb.status_differs({**status, "images": ["docker.io/library/other:1"]}, ready, "")
    pruned = {k: v for k, v in status.items() if k != "images"}  # a CRD that drops status.images
    assert cb.status_differs(pruned, ready, "")
    assert not cb.status_differs(pruned, ready, "", images=False)


def test_the_status_lists_the_images_the_cache_holds() -> None:
    ready = cache("c", phase=READY)
    status = cb.render_status(ready, start_time=NOW, now=NOW)
    assert status["images"] == [image.reference for image in ready.images]
    assert cb.status_images(status) == tuple(status["images"])
    assert cb.status_images({"images": ["nginx:1.7.9"]}) == ("docker.io/library/nginx:1.7.9",)  # by hand


@pytest.mark.parametrize(
    "images", [None, "docker.io/library/nginx:1", [], ["docker.io/library/nginx:1", ""], [1], [{"a": 1}]]
)
def test_status_images_that_are_no_list_of_references_say_nothing(images: object) -> None:
    assert cb.status_images({"images": images}) is None
    assert cb.status_images({}) is None
