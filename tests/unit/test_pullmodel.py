"""The pure pull model: planning, fair shares, the analytic estimate and its calibration."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from vk_provider.domain.catalog import parse_catalog
from vk_provider.domain.model import ImageManifest, Layer
from vk_provider.domain.pullmodel import (
    CALIBRATION_HIT_SECONDS,
    CALIBRATION_MISS_SECONDS,
    CALIBRATION_REFERENCE,
    MB,
    ErrImageNeverPull,
    PodPullPlan,
    PullPolicy,
    PullSettings,
    StepAction,
    estimate_pod_start_seconds,
    estimate_pull_seconds,
    fair_shares,
    plan_pod_pull,
)

CATALOG_FILE = Path(__file__).resolve().parents[2] / "config" / "images.yaml"
DEFAULTS = PullSettings()
ALWAYS, IF_NOT_PRESENT, NEVER = PullPolicy.ALWAYS, PullPolicy.IF_NOT_PRESENT, PullPolicy.NEVER


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def layer(n: int, size_mb: float = 10.0, ratio: float = 2.5) -> Layer:
    return Layer(digest(n), round(size_mb * MB), round(size_mb * MB * ratio))


BASE, APP, LIB, TOOL = layer(1, 29.1), layer(2, 40.0), layer(3, 12.0), layer(4, 5.0)


def image(name: str, *layers: Layer) -> ImageManifest:
    return ImageManifest(f"docker.io/library/{name}:1", digest(999), layers)


WEB = image("web", BASE, APP)
WORKER = image("worker", BASE, LIB)
SIDECAR = image("sidecar", TOOL)


def fetched(plan: PodPullPlan) -> list[list[str]]:
    return [[item.digest for item in step.layers_to_fetch] for step in plan.steps]


# ---- planning -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "present", "cached", "actions", "fetches", "snapshot"),
    [
        pytest.param([(WEB, IF_NOT_PRESENT)], set(), set(), ["pull"], [[BASE.digest, APP.digest]], [], id="miss"),
        pytest.param(
            [(WEB, IF_NOT_PRESENT)], set(), {WEB.reference}, ["present"], [[]], [BASE.digest, APP.digest], id="hit"
        ),
        pytest.param(
            [(WEB, ALWAYS)], set(), {WEB.reference}, ["pull"], [[]], [BASE.digest, APP.digest], id="always-on-hit"
        ),
        pytest.param([(WEB, NEVER)], set(), set(), ["never-pull"], [[]], [], id="never-absent"),
        pytest.param(
            [(WEB, NEVER)], set(), {WEB.reference}, ["present"], [[]], [BASE.digest, APP.digest], id="never-hit"
        ),
        pytest.param(
            [(WEB, IF_NOT_PRESENT), (WORKER, IF_NOT_PRESENT)],
            set(),
            set(),
            ["pull", "pull"],
            [[BASE.digest, APP.digest], [LIB.digest]],
            [],
            id="shared-base-fetched-once",
        ),
        pytest.param(
            [(WEB, IF_NOT_PRESENT), (WEB, IF_NOT_PRESENT)],
            set(),
            set(),
            ["pull", "present"],
            [[BASE.digest, APP.digest], []],
            [],
            id="same-image-twice",
        ),
        pytest.param(
            [(WEB, IF_NOT_PRESENT), (WEB, ALWAYS)],
            set(),
            set(),
            ["pull", "pull"],
            [[BASE.digest, APP.digest], []],
            [],
            id="always-after-pull-costs-a-round-trip-only",
        ),
        pytest.param(
            [(WEB, IF_NOT_PRESENT)], {BASE.digest}, set(), ["pull"], [[APP.digest]], [], id="present-layer-skipped"
        ),
        pytest.param(
            [(WEB, IF_NOT_PRESENT)],
            {BASE.digest, APP.digest},
            set(),
            ["present"],
            [[]],
            [],
            id="entirely-present-skipped",
        ),
        pytest.param(
            [(WEB, IF_NOT_PRESENT), (WORKER, IF_NOT_PRESENT)],
            set(),
            {WEB.reference},
            ["present", "pull"],
            [[], [LIB.digest]],
            [BASE.digest, APP.digest],
            id="partial-hit-shares-base",
        ),
        pytest.param(
            [(image("dup", BASE, TOOL, BASE), IF_NOT_PRESENT)],
            set(),
            set(),
            ["pull"],
            [[BASE.digest, TOOL.digest]],
            [],
            id="repeated-layer-in-one-image",
        ),
    ],
)
def test_plan(
    images: list[tuple[ImageManifest, PullPolicy]],
    present: set[str],
    cached: set[str],
    actions: list[str],
    fetches: list[list[str]],
    snapshot: list[str],
) -> None:
    plan = plan_pod_pull(images, present, cached)
    assert [step.action.value for step in plan.steps] == actions
    assert fetched(plan) == fetches
    assert [item.digest for item in plan.snapshot_layers] == snapshot
    assert plan.attach_snapshot == bool(cached)


def test_never_on_an_absent_image_is_an_error_value() -> None:
    plan = plan_pod_pull([(SIDECAR, IF_NOT_PRESENT), (WEB, NEVER)], set(), set())
    assert plan.errors == (ErrImageNeverPull(WEB.reference),)
    error = plan.errors[0]
    assert error.reason == "ErrImageNeverPull"
    assert error.message == f'Container image "{WEB.reference}" is not present with pull policy of Never'
    # The estimate stops at the error, like the puller.
    only_sidecar = plan_pod_pull([(SIDECAR, IF_NOT_PRESENT)], set(), set())
    with_later_image = plan_pod_pull([(SIDECAR, IF_NOT_PRESENT), (WEB, NEVER), (WORKER, ALWAYS)], set(), set())
    assert estimate_pull_seconds(with_later_image, DEFAULTS) == estimate_pull_seconds(only_sidecar, DEFAULTS)


# ---- fair shares and settings -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("caps", "capacity", "rates"),
    [
        ([10.0, 10.0], 100.0, [10.0, 10.0]),
        ([100.0, 100.0, 100.0, 100.0], 100.0, [25.0, 25.0, 25.0, 25.0]),
        ([5.0, 100.0], 30.0, [5.0, 25.0]),
        ([5.0, 20.0, 100.0], 40.0, [5.0, 17.5, 17.5]),
        ([], 100.0, []),
        ([10.0], 0.0, [0.0]),
    ],
)
def test_fair_shares(caps: list[float], capacity: float, rates: list[float]) -> None:
    assert fair_shares(caps, capacity) == pytest.approx(rates)


@pytest.mark.parametrize(
    ("caps", "counts", "capacity"),
    [([5.0, 20.0, 100.0], [1, 2, 1], 40.0), ([10.0, 3.0], [4, 0], 25.0), ([7.0, 7.5, 2.0], [3, 5, 2], 1000.0)],
)
def test_fair_shares_with_counts_is_the_rate_of_each_of_that_many_flows(
    caps: list[float], counts: list[int], capacity: float
) -> None:
    flows = [cap for cap, count in zip(caps, counts, strict=True) for _ in range(count)]
    each = fair_shares(flows, capacity)
    expected = [each[flows.index(cap)] if count else 0.0 for cap, count in zip(caps, counts, strict=True)]
    assert fair_shares(caps, capacity, counts) == pytest.approx(expected)


def test_default_settings_are_valid_and_keep_the_hit_invariants() -> None:
    assert DEFAULTS.problems() == ()
    assert DEFAULTS.snapshot_attach_seconds <= DEFAULTS.layer_round_trip_seconds
    assert DEFAULTS.snapshot_read_bandwidth >= DEFAULTS.decompression_throughput
    assert DEFAULTS.max_concurrent_layers == 3


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"pod_bandwidth": 0.0}, "pod_bandwidth must be a positive number"),
        ({"registry_bandwidth": float("nan")}, "registry_bandwidth must be a positive number"),
        ({"time_scale": -1.0}, "time_scale must be a positive number"),
        ({"layer_round_trip_seconds": -0.1}, "layer_round_trip_seconds must be zero or more seconds"),
        ({"max_concurrent_layers": 0}, "max_concurrent_layers must be at least 1"),
        ({"max_retries": -1}, "max_retries must be from 0 to 1000, got -1"),
        ({"max_retries": 1001}, "max_retries must be from 0 to 1000, got 1001"),
        ({"jitter": 1.0}, "jitter must be a fraction in [0, 1)"),
        ({"failure_probability": 1.5}, "failure_probability must be in [0, 1]"),
    ],
)
def test_settings_problems_name_the_setting(change: dict[str, Any], fragment: str) -> None:
    problems = replace(DEFAULTS, **change).problems()
    assert len(problems) == 1
    assert fragment in problems[0]


# ---- calibration (SPEC §5) --------------------------------------------------------------------


def calibration_image() -> ImageManifest:
    catalog = parse_catalog(yaml.safe_load(CATALOG_FILE.read_text()), str(CATALOG_FILE))
    manifest = catalog.images[CALIBRATION_REFERENCE]
    return manifest


def test_calibration_image_is_about_386_mb() -> None:
    assert calibration_image().size == pytest.approx(386 * MB, rel=0.02)


@pytest.mark.parametrize(
    ("cached", "reference_seconds"),
    [(False, CALIBRATION_MISS_SECONDS), (True, CALIBRATION_HIT_SECONDS)],
    ids=["without-cache-about-50s", "with-cache-about-5s"],
)
def test_calibration_reproduces_the_reference_points(cached: bool, reference_seconds: float) -> None:
    manifest = calibration_image()
    plan = plan_pod_pull([(manifest, IF_NOT_PRESENT)], set(), {manifest.reference} if cached else set())
    assert estimate_pod_start_seconds(plan, DEFAULTS) == pytest.approx(reference_seconds, rel=0.20)


def test_concurrent_pulls_against_a_saturated_registry_take_n_times_as_long() -> None:
    plan = plan_pod_pull([(calibration_image(), IF_NOT_PRESENT)], set(), set())
    saturated = replace(DEFAULTS, registry_bandwidth=DEFAULTS.pod_bandwidth)
    one = estimate_pull_seconds(plan, saturated, concurrent_pulls=1)
    ten = estimate_pull_seconds(plan, saturated, concurrent_pulls=10)
    assert ten == pytest.approx(10 * one, rel=0.10)
    # Below saturation (15 x 8.5 MB/s > 125 MB/s only from 15 on), concurrency costs nothing.
    assert estimate_pull_seconds(plan, DEFAULTS, concurrent_pulls=10) == one


# ---- properties -------------------------------------------------------------------------------

LAYER_POOL = 10


@st.composite
def layer_pools(draw: st.DrawFn) -> dict[str, Layer]:
    sizes = draw(st.lists(st.integers(1, 300 * MB), min_size=LAYER_POOL, max_size=LAYER_POOL))
    ratios = draw(st.lists(st.floats(1.0, 5.0), min_size=LAYER_POOL, max_size=LAYER_POOL))
    return {
        digest(n): Layer(digest(n), size, round(size * ratio))
        for n, (size, ratio) in enumerate(zip(sizes, ratios, strict=True))
    }


ANY_POLICY = st.sampled_from(list(PullPolicy))


@st.composite
def pods(
    draw: st.DrawFn, policies: st.SearchStrategy[PullPolicy] = ANY_POLICY
) -> tuple[dict[str, Layer], list[tuple[list[str], PullPolicy]]]:
    """A pool of layers and a Pod whose images (1-4, sharing layers freely) are drawn from it."""
    pool = draw(layer_pools())
    digests = sorted(pool)
    images = draw(
        st.lists(
            st.tuples(st.lists(st.sampled_from(digests), min_size=1, max_size=8), policies),
            min_size=1,
            max_size=4,
        )
    )
    return pool, images


def build(pool: dict[str, Layer], images: list[tuple[list[str], PullPolicy]]) -> list[tuple[ImageManifest, PullPolicy]]:
    return [
        (image(f"img{index}", *(pool[d] for d in layer_digests)), policy)
        for index, (layer_digests, policy) in enumerate(images)
    ]


PULLING_POLICIES = st.sampled_from([ALWAYS, IF_NOT_PRESENT])


@given(
    pod=pods(),
    which=st.integers(0, LAYER_POOL - 1),
    extra=st.integers(1, 200 * MB),
    unpacked=st.booleans(),
    concurrent=st.integers(1, 50),
)
def test_more_bytes_never_pull_faster(
    pod: tuple[dict[str, Layer], list[tuple[list[str], PullPolicy]]],
    which: int,
    extra: int,
    unpacked: bool,
    concurrent: int,
) -> None:
    pool, images = pod
    grown = dict(pool)
    old = pool[digest(which)]
    grown[old.digest] = (
        replace(old, uncompressed_size=old.uncompressed_size + extra)
        if unpacked
        else replace(old, size=old.size + extra)
    )
    before = plan_pod_pull(build(pool, images), set(), set())
    after = plan_pod_pull(build(grown, images), set(), set())
    assert estimate_pull_seconds(after, DEFAULTS, concurrent) >= estimate_pull_seconds(before, DEFAULTS, concurrent)


@given(pod=pods(PULLING_POLICIES), concurrent=st.integers(1, 50))
def test_a_cache_hit_is_never_slower_than_a_miss(
    pod: tuple[dict[str, Layer], list[tuple[list[str], PullPolicy]]], concurrent: int
) -> None:
    # A fresh instance (nothing present, as every ECI Pod) and a cache holding all the Pod's images.
    images = build(*pod)
    miss = plan_pod_pull(images, set(), set())
    hit = plan_pod_pull(images, set(), {manifest.reference for manifest, _ in images})
    assert estimate_pull_seconds(hit, DEFAULTS, concurrent) <= estimate_pull_seconds(miss, DEFAULTS, concurrent)
    assert estimate_pod_start_seconds(hit, DEFAULTS) <= estimate_pod_start_seconds(miss, DEFAULTS)


@given(pod=pods(), cached_first=st.booleans())
def test_a_cache_hit_on_a_single_image_pod_is_never_slower(
    pod: tuple[dict[str, Layer], list[tuple[list[str], PullPolicy]]], cached_first: bool
) -> None:
    pool, images = pod
    single = build(pool, images[:1])
    miss = plan_pod_pull(single, set(), set())
    hit = plan_pod_pull(single, set(), {single[0][0].reference})
    assert not hit.errors
    if not miss.errors:
        assert estimate_pull_seconds(hit, DEFAULTS) <= estimate_pull_seconds(miss, DEFAULTS)


@given(pod=pods(PULLING_POLICIES), present=st.sets(st.integers(0, LAYER_POOL - 1), max_size=4))
def test_shared_layers_are_fetched_once(
    pod: tuple[dict[str, Layer], list[tuple[list[str], PullPolicy]]], present: set[int]
) -> None:
    pool, images = pod
    present_digests = {digest(n) for n in present}
    plan = plan_pod_pull(build(pool, images), present_digests, set())
    all_fetched = [d for step in fetched(plan) for d in step]
    wanted = {d for layer_digests, _ in images for d in layer_digests} - present_digests
    assert sorted(all_fetched) == sorted(wanted)
    assert plan.bytes_to_fetch == sum(pool[d].size for d in wanted)


@given(pod=pods(), seed=st.integers(0, 2**32), jitter=st.floats(0.0, 0.5))
def test_the_same_seed_gives_the_same_durations(
    pod: tuple[dict[str, Layer], list[tuple[list[str], PullPolicy]]], seed: int, jitter: float
) -> None:
    settings = replace(DEFAULTS, jitter=jitter)
    plan = plan_pod_pull(build(*pod), set(), set())
    first = estimate_pull_seconds(plan, settings, rng=random.Random(seed))
    again = estimate_pull_seconds(plan, settings, rng=random.Random(seed))
    steady = estimate_pull_seconds(plan, settings)
    assert first == again
    assert steady * (1 - jitter) - 1e-9 <= first <= steady * (1 + jitter) + 1e-9


def test_different_seeds_give_different_durations() -> None:
    plan = plan_pod_pull([(WEB, IF_NOT_PRESENT), (WORKER, IF_NOT_PRESENT)], set(), set())
    draws = {estimate_pull_seconds(plan, DEFAULTS, rng=random.Random(seed)) for seed in range(10)}
    assert len(draws) == 10


def test_step_action_values_are_stable() -> None:
    # Stored in the registry and shown in logs: renaming one is a schema change.
    assert [action.value for action in StepAction] == ["present", "pull", "never-pull"]
