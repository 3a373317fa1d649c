"""The async puller on a virtual-time event loop: no test waits in real time.

``VirtualTimeLoop`` jumps its clock straight to the next timer whenever it would otherwise block, so
a 50-second simulated pull runs in milliseconds while ``loop.time()``, ``asyncio.sleep`` and the
puller's default clock behave exactly as on a real loop. Durations asserted are SIMULATED seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import signal
import threading
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from vk_provider.controllers.clock import FakeClock
from vk_provider.controllers.images import PlannedPodImages
from vk_provider.controllers.pods import ImagePullError
from vk_provider.controllers.puller import (
    BandwidthPool,
    ImagePullEvent,
    ImagePullEventKind,
    ImagePullOutcome,
    PodPullResult,
    Puller,
    PullFailed,
)
from vk_provider.domain.model import ImageManifest, Layer
from vk_provider.domain.podspec import ContainerSpec
from vk_provider.domain.pullmodel import (
    MB,
    ImagePullStep,
    PodPullPlan,
    PullPolicy,
    PullSettings,
    distinct_layers,
    estimate_pull_seconds,
    fair_shares,
    fetch_seconds,
    plan_pod_pull,
)
from vk_provider.virtualtime import run_virtual

NO_JITTER = PullSettings(jitter=0.0)


def layer(name: str, size_mb: float, ratio: float = 2.5) -> Layer:
    digest = "sha256:" + name.encode().hex().ljust(64, "0")[:64]
    return Layer(digest=digest, size=round(size_mb * MB), uncompressed_size=round(size_mb * MB * ratio))


def image(name: str, *layers: Layer) -> ImageManifest:
    return ImageManifest(f"docker.io/library/{name}", "sha256:" + "0" * 64, layers)


# Like the calibration image: ~386 MB compressed, ~1 GB uncompressed, one dominant layer.
BIG = image(
    "big:1",
    layer("b1", 49.6, 2.36),
    layer("b2", 24.1, 2.45),
    layer("b3", 64.4, 2.95),
    layer("b4", 211.4, 2.74),
    layer("b5", 6.2, 2.9),
    layer("b6", 30.3, 1.9),
)
SMALL = image("small:1", layer("s1", 3.6), layer("s2", 12.0))


def miss(*manifests: ImageManifest, policy: PullPolicy = PullPolicy.IF_NOT_PRESENT) -> PodPullPlan:
    return plan_pod_pull([(m, policy) for m in manifests], set(), set())


def test_an_interrupted_virtual_run_stops_the_tasks_its_tasks_start_as_they_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stopped: list[str] = []

    async def pulling(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.append(name)
            if name == "a":  # as a bandwidth pool re-times its downloads when one leaves
                asyncio.get_running_loop().create_task(pulling("a-timer"))

    async def main() -> None:
        asyncio.get_running_loop().create_task(pulling("a"))
        await asyncio.sleep(1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_virtual(main)
    gc.collect()  # a task left pending when the loop closed logs "Task was destroyed but it is pending!"
    assert stopped == ["a", "a-timer"]
    assert caplog.records == []


async def pull_concurrently(puller: Puller, plans: list[PodPullPlan]) -> list[PodPullResult]:
    return list(await asyncio.gather(*(puller.pull_pod(plan) for plan in plans)))


def test_virtual_loop_fast_forwards_sleeps() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(3600)
        return loop.time() - start

    assert run_virtual(main) == pytest.approx(3600)


@pytest.mark.parametrize("manifest", [BIG, SMALL], ids=["big", "small"])
def test_one_pull_agrees_with_the_analytic_estimate(manifest: ImageManifest) -> None:
    plan = miss(manifest)
    result = run_virtual(lambda: Puller(NO_JITTER, random.Random(1)).pull_pod(plan))
    assert result.ok
    assert result.bytes_downloaded == manifest.size
    assert result.seconds == pytest.approx(estimate_pull_seconds(plan, NO_JITTER), rel=0.10)


def test_calibration_image_pulls_in_about_fifty_seconds() -> None:
    plan = miss(BIG)
    result = run_virtual(lambda: Puller(NO_JITTER, random.Random(1)).pull_pod(plan))
    start = result.seconds + NO_JITTER.container_start_seconds
    assert 40 <= start <= 60


@pytest.mark.parametrize("pods", [2, 5, 10])
def test_concurrent_pulls_against_a_saturated_registry_take_n_times_as_long(pods: int) -> None:
    # One Pod alone already fills the registry, so N Pods share it N ways.
    settings = replace(NO_JITTER, registry_bandwidth=NO_JITTER.pod_bandwidth)
    plan = miss(BIG)
    alone = run_virtual(lambda: Puller(settings, random.Random(1)).pull_pod(plan)).seconds
    together = run_virtual(lambda: pull_concurrently(Puller(settings, random.Random(1)), [plan] * pods))
    slowest = max(result.seconds for result in together)
    assert slowest == pytest.approx(pods * alone, rel=0.10)


def test_a_hundred_pods_at_once_are_slower_than_one_at_default_settings() -> None:
    plan = miss(BIG)
    alone = run_virtual(lambda: Puller(NO_JITTER, random.Random(1)).pull_pod(plan)).seconds
    crowd = run_virtual(lambda: pull_concurrently(Puller(NO_JITTER, random.Random(1)), [plan] * 100))
    assert min(result.seconds for result in crowd) > 3 * alone
    # 100 x 386 MB through a 125 MB/s registry cannot be faster than the registry allows.
    assert max(result.seconds for result in crowd) >= 100 * BIG.size / NO_JITTER.registry_bandwidth


def test_pool_never_hands_out_more_than_its_capacity() -> None:
    settings = replace(NO_JITTER, registry_bandwidth=20 * MB)
    samples: list[float] = []

    async def main() -> None:
        puller = Puller(settings, random.Random(1))
        pulls = asyncio.gather(*(puller.pull_pod(miss(BIG)) for _ in range(4)))
        for _ in range(20):
            await asyncio.sleep(5)
            samples.append(puller.pool.allocated)
        await pulls

    run_virtual(main)
    assert max(samples) == pytest.approx(20 * MB)
    assert all(sample <= 20 * MB * (1 + 1e-9) for sample in samples)


def test_cancelling_a_pull_releases_its_bandwidth() -> None:
    settings = replace(NO_JITTER, registry_bandwidth=NO_JITTER.pod_bandwidth)
    plan = miss(BIG)
    alone = run_virtual(lambda: Puller(settings, random.Random(1)).pull_pod(plan)).seconds
    observed: dict[str, float] = {}

    async def main() -> PodPullResult:
        puller = Puller(settings, random.Random(1))
        cancelled = asyncio.create_task(puller.pull_pod(plan))
        kept = asyncio.create_task(puller.pull_pod(plan))
        await asyncio.sleep(alone / 2)
        observed["allocated_while_both"] = puller.pool.allocated
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        observed["downloads_after_cancel"] = puller.pool.active_downloads
        observed["allocated_after_cancel"] = puller.pool.allocated
        result = await kept
        observed["downloads_at_end"] = puller.pool.active_downloads
        return result

    kept = run_virtual(main)
    # Half the time at half the rate, then the whole registry: ~1.25 times alone (twice had it stayed).
    assert kept.seconds == pytest.approx(1.25 * alone, rel=0.10)
    assert observed["allocated_while_both"] == pytest.approx(settings.registry_bandwidth)
    assert 0 < observed["downloads_after_cancel"] <= settings.max_concurrent_layers
    assert observed["allocated_after_cancel"] == pytest.approx(settings.registry_bandwidth)
    assert observed["downloads_at_end"] == 0


def test_same_seed_same_durations_and_another_seed_differs() -> None:
    settings = PullSettings(jitter=0.2)
    plans = [miss(BIG), miss(SMALL), miss(BIG, SMALL)]

    def durations(seed: int) -> list[float]:
        results = run_virtual(lambda: pull_concurrently(Puller(settings, random.Random(seed)), plans))
        return [result.seconds for result in results]

    assert durations(7) == durations(7)
    assert durations(7) != durations(8)


def test_events_report_each_image_as_it_happens() -> None:
    cached_plan = plan_pod_pull(
        [(SMALL, PullPolicy.IF_NOT_PRESENT), (BIG, PullPolicy.IF_NOT_PRESENT), (BIG, PullPolicy.ALWAYS)],
        set(),
        {SMALL.reference},
    )
    events: list[tuple[ImagePullEvent, float]] = []

    async def main() -> PodPullResult:
        loop = asyncio.get_running_loop()

        async def record(event: ImagePullEvent) -> None:
            events.append((event, loop.time()))

        return await Puller(NO_JITTER, random.Random(1)).pull_pod(cached_plan, record)

    result = run_virtual(main)
    kinds = [(event.kind, event.image, event.already_present) for event, _ in events]
    assert kinds == [
        (ImagePullEventKind.PULLED, SMALL.reference, True),
        (ImagePullEventKind.PULLING, BIG.reference, False),
        (ImagePullEventKind.PULLED, BIG.reference, False),
        (ImagePullEventKind.PULLING, BIG.reference, False),
        (ImagePullEventKind.PULLED, BIG.reference, False),
    ]
    first_pull, always_again = events[2][0], events[4][0]
    assert first_pull.bytes_downloaded == BIG.size
    assert first_pull.image_size == BIG.size
    assert first_pull.duration_seconds == pytest.approx(events[2][1] - events[1][1])
    # Always on a present image: a manifest round trip, no bytes.
    assert always_again.bytes_downloaded == 0
    assert always_again.duration_seconds == pytest.approx(NO_JITTER.manifest_round_trip_seconds)
    assert events[0][0].from_cache
    assert result.snapshot_seconds > 0
    assert result.seconds == pytest.approx(events[-1][1])


def test_injected_failures_retry_then_fail_with_err_image_pull() -> None:
    settings = replace(NO_JITTER, failure_probability=1.0, max_retries=2, retry_backoff_seconds=10.0)
    result = run_virtual(lambda: Puller(settings, random.Random(1)).pull_pod(miss(SMALL)))
    assert result.failure is not None
    assert result.failure.reason == "ErrImagePull"
    assert result.failure.image == SMALL.reference
    assert result.failure.attempts == 3
    assert "gave up after 3 attempts" in result.failure.message
    # Three manifest round trips and back-offs of 10 s and 20 s; no layer was fetched.
    assert result.seconds == pytest.approx(3 * settings.manifest_round_trip_seconds + 30)
    assert result.bytes_downloaded == 0


def test_never_policy_on_an_absent_image_fails_without_pulling() -> None:
    plan = plan_pod_pull([(SMALL, PullPolicy.IF_NOT_PRESENT), (BIG, PullPolicy.NEVER)], set(), set())
    result = run_virtual(lambda: Puller(NO_JITTER, random.Random(1)).pull_pod(plan))
    assert result.failure is not None
    assert result.failure.reason == "ErrImageNeverPull"
    assert BIG.reference in result.failure.message
    assert [outcome.image for outcome in result.images] == [SMALL.reference]


def test_cache_build_reports_progress_in_bytes_at_the_build_bandwidth() -> None:
    progress: list[tuple[int, int]] = []

    async def record(done: int, total: int) -> None:
        progress.append((done, total))

    built = run_virtual(lambda: Puller(NO_JITTER, random.Random(1)).pull_for_cache([BIG, SMALL, BIG], record))
    total = BIG.size + SMALL.size
    assert built.total_bytes == built.bytes_downloaded == total
    assert progress[0] == (0, total)
    assert progress[-1] == (total, total)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    assert built.seconds >= total / NO_JITTER.cache_build_bandwidth
    # The build runs at the build bandwidth, far above a Pod's; the estimate is a lower bound here
    # because the 211 MB layer, bound by one stream's 25 MB/s, starts only when a slot frees up.
    layers = distinct_layers([BIG, SMALL])
    at_build = fetch_seconds(layers, NO_JITTER, NO_JITTER.cache_build_bandwidth)
    at_pod = fetch_seconds(layers, NO_JITTER, NO_JITTER.pod_bandwidth)
    assert at_build <= built.seconds <= 1.3 * at_build
    assert built.seconds < at_pod / 2


def test_cache_build_skips_reused_layers() -> None:
    reused = {item.digest for item in BIG.layers}
    built = run_virtual(lambda: Puller(NO_JITTER, random.Random(1)).pull_for_cache([BIG, SMALL], skip_layers=reused))
    assert built.bytes_downloaded == built.total_bytes == SMALL.size


def test_time_scale_runs_faster_on_the_clock_but_reports_simulated_seconds() -> None:
    scaled = replace(NO_JITTER, time_scale=10.0)
    clock_seconds: dict[str, float] = {}

    async def main(settings: PullSettings) -> PodPullResult:
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await Puller(settings, random.Random(1)).pull_pod(miss(BIG))
        clock_seconds[str(settings.time_scale)] = loop.time() - start
        return result

    real = run_virtual(lambda: main(NO_JITTER))
    fast = run_virtual(lambda: main(scaled))
    assert fast.seconds == pytest.approx(real.seconds, rel=1e-6)
    assert clock_seconds["10.0"] == pytest.approx(clock_seconds["1.0"] / 10, rel=1e-6)


def test_puller_runs_on_an_injected_fake_clock() -> None:
    async def main() -> PodPullResult:
        clock = FakeClock()
        puller = Puller(NO_JITTER, random.Random(1), clock=clock)
        task = asyncio.create_task(puller.pull_pod(miss(SMALL)))
        for _ in range(200):
            if task.done():
                break
            await clock.advance(0.5)
        return await task

    result: Any = asyncio.run(main())
    assert result.seconds == pytest.approx(estimate_pull_seconds(miss(SMALL), NO_JITTER), rel=0.10)


def test_pool_alone_shares_between_groups_max_min_fairly() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        pool = BandwidthPool(capacity=30.0, clock=_LoopClock())
        slow, fast = object(), object()
        finished: list[float] = []

        async def one(group: object, cap: float) -> None:
            await pool.transfer(100.0, stream_cap=100.0, group=group, group_cap=cap)
            finished.append(loop.time())

        # slow is capped at 5/s, so fast gets the other 25/s: 4 s for fast, 20 s for slow
        # (fast's departure cannot speed slow up beyond its own cap).
        await asyncio.gather(one(slow, 5.0), one(fast, 100.0))
        return finished

    assert run_virtual(main) == pytest.approx([4.0, 20.0])


@dataclass(frozen=True)
class _Download:
    start: float
    work: float
    group: int
    stream_cap: float
    group_cap: float
    cancel_at: float | None = None


def _scenario(seed: int, count: int) -> list[_Download]:
    """Downloads arriving over time in groups of changing size, with a few caps and a few cancellations."""
    rng = random.Random(seed)
    group_caps = [rng.choice([8.0, 12.0, 30.0, 1000.0]) for _ in range(count // 4)]
    downloads = []
    for _ in range(count):
        group = rng.randrange(len(group_caps))
        start = round(rng.uniform(0, 40), 1)
        cancel = start + rng.uniform(0.5, 10) if rng.random() < 0.1 else None
        downloads.append(
            _Download(start, rng.uniform(1, 60), group, rng.choice([5.0, 9.0, 1000.0]), group_caps[group], cancel)
        )
    return downloads


def _reference_finishes(downloads: list[_Download], capacity: float) -> dict[int, float]:
    """The fluid model by brute force: every download's rate from fair_shares over all of them, at every event."""
    waiting = dict(enumerate(downloads))
    remaining: dict[int, float] = {}  # the active downloads' bytes to go
    finishes: dict[int, float] = {}
    now = 0.0
    while True:
        for i, d in list(waiting.items()):
            if d.start <= now:
                remaining[i] = d.work
                del waiting[i]
        order = sorted(remaining)
        members = Counter(downloads[i].group for i in order)
        caps = [min(downloads[i].stream_cap, downloads[i].group_cap / members[downloads[i].group]) for i in order]
        rates = dict(zip(order, fair_shares(caps, capacity), strict=True))
        events = [d.start for d in waiting.values()]
        events += [c for i in order if (c := downloads[i].cancel_at) is not None]
        events += [now + remaining[i] / rates[i] for i in order if rates[i] > 0]
        if not events:
            return finishes
        then = min(events)
        for i in order:
            remaining[i] -= rates[i] * (then - now)
        now = then
        for i in order:
            cancel_at = downloads[i].cancel_at
            if remaining[i] <= 1e-9 * rates[i]:
                finishes[i] = now
                del remaining[i]
            elif cancel_at is not None and cancel_at <= now:
                del remaining[i]


def _run_pool(downloads: list[_Download], capacity: float, time_scale: float = 1.0) -> tuple[dict[int, float], int]:
    """Each download through one BandwidthPool on a virtual-time loop: the simulated second each one
    finished (the cancelled ones are left out), and the most heap entries any class held."""

    async def main() -> tuple[dict[int, float], int]:
        loop = asyncio.get_running_loop()
        pool = BandwidthPool(capacity, _LoopClock(), time_scale)
        groups = [object() for _ in downloads]
        finishes: dict[int, float] = {}
        largest_heap = 0

        async def one(i: int, d: _Download) -> None:
            nonlocal largest_heap
            await asyncio.sleep(d.start / time_scale)
            transfer = asyncio.ensure_future(
                pool.transfer(d.work, stream_cap=d.stream_cap, group=groups[d.group], group_cap=d.group_cap)
            )
            largest_heap = max([largest_heap, *(len(c.heap) for c in pool._classes.values())])
            if d.cancel_at is None:
                await transfer
            else:
                done, _ = await asyncio.wait([transfer], timeout=(d.cancel_at - d.start) / time_scale)
                if not done:
                    transfer.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await transfer
                    assert pool.allocated <= capacity * (1 + 1e-9)
                    return
            finishes[i] = loop.time() * time_scale
            assert pool.allocated <= capacity * (1 + 1e-9)

        await asyncio.gather(*(one(i, d) for i, d in enumerate(downloads)))
        assert pool.active_downloads == 0
        assert pool.allocated == 0
        return finishes, largest_heap

    return run_virtual(main)


def _assert_same_finishes(got: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(got) == sorted(expected)
    for i, seconds in expected.items():
        assert got[i] == pytest.approx(seconds, rel=1e-6, abs=1e-6), i


@pytest.mark.parametrize(("seed", "count", "time_scale"), [(1, 40, 1.0), (2, 120, 1.0), (3, 300, 4.0)])
def test_pool_finishes_every_download_when_the_brute_force_fluid_model_does(
    seed: int, count: int, time_scale: float
) -> None:
    downloads = _scenario(seed, count)
    expected = _reference_finishes(downloads, 60.0)
    assert len(expected) > count * 0.8  # most finish; the rest were cancelled first
    got, _ = _run_pool(downloads, 60.0, time_scale)
    _assert_same_finishes(got, expected)


def test_pool_books_stay_small_through_many_cap_changes() -> None:
    # A Pod pulling one long layer at its 10/s cap; 300 times a short layer joins it, halving its
    # per-layer cap until it ends, so the long layer changes class 600 times and leaves an entry
    # behind each time. Other Pods' short layers keep its class busy throughout: those entries
    # never come to the top of its heap, and only clearing them out keeps them from piling up.
    downloads = [_Download(0.0, 100_000.0, 0, 1000.0, 10.0)]
    downloads += [_Download(0.5 + 2 * n, 1.0, 0, 1000.0, 10.0) for n in range(300)]
    downloads += [_Download(float(n), 30.0, 1 + n % 5, 1000.0, 10.0) for n in range(610)]
    got, largest_heap = _run_pool(downloads, 1000.0)
    _assert_same_finishes(got, _reference_finishes(downloads, 1000.0))
    assert largest_heap <= 2 * 4 + 64 + 1  # at most 4 downloads in that class at once


class _LoopClock:
    """The running loop's clock, for a pool built outside a Puller."""

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def now(self) -> Any:  # pragma: no cover - the pool never asks for wall time
        raise AssertionError("the bandwidth pool must not read the wall clock")


# ------------------------------------------------------------------ a Pod's images pulled out of order


class FailFirstPull(Puller):
    """A puller whose first pull of ``image`` fails (a registry hiccup)."""

    def __init__(self, image: str) -> None:
        super().__init__(NO_JITTER, random.Random(1))
        self.image = image
        self.fetched: list[tuple[str, int]] = []

    async def pull_step(self, step: ImagePullStep, group: object) -> ImagePullOutcome | PullFailed:
        if step.reference == self.image and not any(ref == self.image for ref, _ in self.fetched):
            self.fetched.append((step.reference, -1))
            return PullFailed(step.reference, "ErrImagePull", "registry hiccup")
        outcome = await super().pull_step(step, group)
        if isinstance(outcome, ImagePullOutcome):
            self.fetched.append((step.reference, outcome.bytes_downloaded))
        return outcome


BASE = layer("base", 30.0)
F1 = layer("f1", 5.0)
K1 = layer("k1", 7.0)
FRONT = image("front:1", BASE, F1)
BACK = image("back:1", BASE, K1)


@pytest.mark.parametrize(
    ("second", "policy", "second_gets", "first_gets"),
    [
        # The shared base was not there yet: the second fetches it, the first then only its own layer.
        (BACK, PullPolicy.IF_NOT_PRESENT, BASE.size + K1.size, F1.size),
        # The same image: not "already present" for the second; present for the first's retry.
        (FRONT, PullPolicy.IF_NOT_PRESENT, FRONT.size, 0),
        # Nothing pulled yet: Never is ErrImageNeverPull, not a free start.
        (
            FRONT,
            PullPolicy.NEVER,
            'ErrImageNeverPull: Container image "front:1" is not present with pull policy of Never',
            FRONT.size,
        ),
    ],
    ids=["shared-base", "same-image", "never"],
)
def test_a_container_pulling_before_an_earlier_failed_one_gets_what_it_really_needs(
    second: ImageManifest, policy: PullPolicy, second_gets: int | str, first_gets: int
) -> None:
    first_spec = ContainerSpec("first", "front:1", "IfNotPresent")  # as the Pod spells them
    second_spec = ContainerSpec("second", second.reference.rsplit("/", 1)[-1], policy.value)
    plan = plan_pod_pull([(FRONT, PullPolicy.IF_NOT_PRESENT), (second, policy)], present_layers=(), cached_images=())

    async def main() -> tuple[int | str, int]:
        images = PlannedPodImages(
            FailFirstPull(FRONT.reference), plan, dict(zip(("first", "second"), plan.steps, strict=True)), {}
        )
        with pytest.raises(ImagePullError):
            await images.pull(first_spec)  # fails; the kubelet goes on to the next container
        try:
            got: int | str = (await images.pull(second_spec)).downloaded
        except ImagePullError as exc:
            got = f"{exc.reason}: {exc.message}"
        return got, (await images.pull(first_spec)).downloaded  # the first again, after its back-off

    assert run_virtual(main) == (second_gets, first_gets)


@pytest.mark.parametrize(("policy", "pulls"), [(PullPolicy.IF_NOT_PRESENT, False), (PullPolicy.ALWAYS, True)])
def test_a_container_that_ran_before_an_agent_restart_has_its_image(policy: PullPolicy, pulls: bool) -> None:
    spec = ContainerSpec("first", "front:1", policy.value)
    plan = plan_pod_pull([(FRONT, policy)], present_layers=(), cached_images=())

    async def main() -> tuple[bool, bool, int]:
        puller = FailFirstPull("nothing")
        images = PlannedPodImages(puller, plan, {"first": plan.steps[0]}, {})
        images.ran_before(spec)
        result = await images.pull(spec)
        return images.will_pull(spec), result.present, len(puller.fetched)

    # Always asks the registry for the manifest (no layers fetched); otherwise it is just there.
    assert run_virtual(main) == (pulls, not pulls, 0)


def test_virtual_time_keeps_running_timers_however_far_it_goes() -> None:
    async def main() -> float:
        for _ in range(200):
            await asyncio.sleep(86400)  # 200 days: past 2**24 s, where a 1e-9 s step is lost in rounding
        await asyncio.sleep(1e12)  # ~31,700 years: one jump, not a loop turn per simulated day
        return asyncio.get_running_loop().time()

    results: list[float] = []
    runner = threading.Thread(target=lambda: results.append(run_virtual(main)), daemon=True)
    runner.start()
    runner.join(10)  # a deadline, not a wait: it takes milliseconds, or spins for ever
    assert results == [200 * 86400 + 1e12]


def test_an_interrupted_virtual_run_stops_its_tasks() -> None:
    stopped: list[str] = []

    async def pulling(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.append(name)

    async def main() -> None:
        for name in ("a", "b"):
            asyncio.get_running_loop().create_task(pulling(name))
        await asyncio.sleep(1)
        raise KeyboardInterrupt  # Ctrl-C during `vk-provider simulate`

    with pytest.raises(KeyboardInterrupt):
        run_virtual(main)
    assert sorted(stopped) == ["a", "b"]  # cancelled, not left to complain when collected


class _InterruptingClock:
    """The loop's virtual clock, but Ctrl-C comes once ``at`` is reached, in a bandwidth pool's timer
    task as it reads the clock: the timer no longer in the pool's hands (as in the field)."""

    def __init__(self, at: float) -> None:
        self.at = at
        self.interrupted_in: str | None = None

    def now(self) -> datetime:
        return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=self.monotonic())

    def monotonic(self) -> float:
        now = asyncio.get_running_loop().time()
        task = asyncio.current_task()
        name = task.get_name() if task is not None else ""
        if self.interrupted_in is None and now >= self.at and name.startswith("bandwidth-pool-timer-"):
            self.interrupted_in = name
            signal.raise_signal(signal.SIGINT)  # Python's handler runs here, in this task's frame
        return now

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def test_ctrl_c_during_a_virtual_run_cancels_it_without_killing_a_task(caplog: pytest.LogCaptureFixture) -> None:
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    clock = _InterruptingClock(at=5.0)
    pools = [BandwidthPool(10 * MB, clock)]

    async def main() -> None:
        group = object()
        await asyncio.gather(
            *(pools[0].transfer(size * MB, stream_cap=10 * MB, group=group, group_cap=10 * MB) for size in (20, 40, 80))
        )

    with pytest.raises(KeyboardInterrupt):
        run_virtual(main)
    assert clock.interrupted_in is not None
    assert clock.interrupted_in.startswith("bandwidth-pool-timer-")
    assert pools[0].active_downloads == 0  # every download left the pool
    pools.clear()  # and with it its tasks: one that died of the KeyboardInterrupt logs it when collected
    gc.collect()
    assert "never retrieved" not in caplog.text
    assert caplog.records == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works as before again
