"""The puller: executes pull plans in simulated time, sharing the registry between concurrent pulls.

Owns the :class:`BandwidthPool` (fluid, max-min fair sharing of the registry's bandwidth between
every active layer download of every Pod and cache build: whenever a download starts or ends, the
remaining bytes of all the others are re-timed) and the :class:`Puller`, which runs one Pod's
:class:`~vk_provider.domain.pullmodel.PodPullPlan` (snapshot attach, then images one at a time,
at most ``max_concurrent_layers`` layers at once, each layer extracted in order after its download),
builds ImageCaches at the build bandwidth, and injects failures.

Time: only the injected :class:`~vk_provider.controllers.clock.Clock` (by default the running
loop's clock), never ``time.time``, so tests fast-forward. ``settings.time_scale`` simulated seconds
pass per clock second, and every duration this module reports is in SIMULATED seconds. Chance: only
the injected ``random.Random``.

Must not: decide what to pull (``domain.pullmodel`` plans it), post Events or touch the registry
database (callers do, from the events and results returned here). Cancelling a pull is always
clean: its downloads leave the pool at once and no task outlives it.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from vk_provider.controllers.clock import Clock, SystemClock
from vk_provider.domain.model import ImageManifest, Layer
from vk_provider.domain.pullmodel import (
    ImagePullStep,
    PodPullPlan,
    PullPolicy,
    PullSettings,
    StepAction,
    distinct_layers,
    fair_shares,
    jitter_factor,
    snapshot_seconds,
)

# A flow this close to done (in simulated seconds at its current rate) counts as done: float
# rounding must never leave a sliver of bytes that re-arms the timer forever.
_DONE_WITHIN_SECONDS = 1e-9


class ImagePullEventKind(enum.StrEnum):
    PULLING = "Pulling"
    PULLED = "Pulled"


@dataclass(frozen=True, slots=True)
class ImagePullEvent:
    """Something the caller may turn into a Pod Event, as it happens.

    ``Pulling`` comes when an image's pull starts; ``Pulled`` when it is present: either pulled
    (``duration_seconds`` simulated, ``bytes_downloaded``) or ``already_present`` (the kubelet's
    "Container image … already present on machine"). ``image_size`` is the compressed size, as
    containerd's CRI reports it in "Image size: N bytes".
    """

    kind: ImagePullEventKind
    image: str
    policy: PullPolicy
    already_present: bool
    duration_seconds: float
    bytes_downloaded: int
    image_size: int
    from_cache: bool = False


@dataclass(frozen=True, slots=True)
class PullFailed:
    """Why a Pod's images could not all be made present: ``ErrImagePull`` or ``ErrImageNeverPull``."""

    image: str
    reason: str
    message: str
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class ImagePullOutcome:
    """One image of a pull: how long it took (simulated seconds) and what it downloaded."""

    image: str
    already_present: bool
    from_cache: bool
    seconds: float
    bytes_downloaded: int
    attempts: int


@dataclass(frozen=True, slots=True)
class PodPullResult:
    """A finished (or failed) Pod pull; ``seconds`` covers snapshot attach and every image, simulated."""

    images: tuple[ImagePullOutcome, ...]
    snapshot_seconds: float
    seconds: float
    failure: PullFailed | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def bytes_downloaded(self) -> int:
        return sum(image.bytes_downloaded for image in self.images)


@dataclass(frozen=True, slots=True)
class CacheBuildResult:
    """The pull half of an ImageCache build (the snapshot step is the caller's)."""

    seconds: float
    bytes_downloaded: int
    total_bytes: int


ImageEventHandler = Callable[[ImagePullEvent], Awaitable[None]]
ProgressHandler = Callable[[int, int], Awaitable[None]]


@dataclass(eq=False, slots=True)
class _Flow:
    remaining: float
    stream_cap: float
    group: object
    group_cap: float
    done: asyncio.Future[None]
    rate: float = 0.0


@dataclass(eq=False, slots=True)
class _Group:
    """Identity of one Pod pull or cache build: its downloads share one bandwidth cap."""

    name: str


class BandwidthPool:
    """The registry's bandwidth, shared max-min fairly by every active layer download.

    Each download is capped by its stream cap and by an equal part of its group's cap (a Pod's
    bandwidth, split between that Pod's active downloads); the registry's ``capacity`` is then
    water-filled between all downloads. Rates change only when a download starts or ends, so the
    pool keeps one timer for the next completion and re-times everyone on each change. Bytes and
    rates are simulated; clock time is simulated time / ``time_scale``.
    """

    def __init__(self, capacity: float, clock: Clock, time_scale: float = 1.0) -> None:
        self._capacity = capacity
        self._clock = clock
        self._time_scale = time_scale
        self._flows: list[_Flow] = []
        self._last = 0.0
        self._timer: asyncio.Task[None] | None = None
        self._timer_names = itertools.count()

    @property
    def active_downloads(self) -> int:
        return len(self._flows)

    @property
    def allocated(self) -> float:
        """Bytes/s currently handed out (never more than the capacity)."""
        return sum(flow.rate for flow in self._flows)

    def rates(self, group: object) -> list[float]:
        """The current rates of ``group``'s downloads (for tests and metrics)."""
        return [flow.rate for flow in self._flows if flow.group is group]

    async def transfer(self, work: float, *, stream_cap: float, group: object, group_cap: float) -> None:
        """Move ``work`` bytes through the pool; returns when they are through.

        Cancelling releases this download's share immediately.
        """
        if work <= 0:
            return
        flow = _Flow(
            remaining=work,
            stream_cap=stream_cap,
            group=group,
            group_cap=group_cap,
            done=asyncio.get_running_loop().create_future(),
        )
        self._advance()
        self._flows.append(flow)
        self._retime()
        try:
            await flow.done
        finally:
            if flow in self._flows:
                self._advance()
                self._flows.remove(flow)
                self._retime()

    def _advance(self) -> None:
        now = self._clock.monotonic()
        elapsed = (now - self._last) * self._time_scale
        self._last = now
        if elapsed > 0:
            for flow in self._flows:
                flow.remaining -= flow.rate * elapsed

    def _retime(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._flows:
            return
        per_group = Counter(flow.group for flow in self._flows)
        caps = [min(flow.stream_cap, flow.group_cap / per_group[flow.group]) for flow in self._flows]
        for flow, rate in zip(self._flows, fair_shares(caps, self._capacity), strict=True):
            flow.rate = rate
        moving = [flow for flow in self._flows if flow.rate > 0]
        if not moving:
            return
        first = min(moving, key=lambda flow: flow.remaining / flow.rate)
        delay = max(0.0, first.remaining / first.rate) / self._time_scale
        self._timer = asyncio.create_task(
            self._complete_after(first, delay), name=f"bandwidth-pool-timer-{next(self._timer_names)}"
        )

    async def _complete_after(self, first: _Flow, delay: float) -> None:
        await self._clock.sleep(delay)
        # Any change to the pool cancels this timer, so reaching here means ``first`` is done.
        self._timer = None
        self._advance()
        finished = [flow for flow in self._flows if flow is first or flow.remaining <= flow.rate * _DONE_WITHIN_SECONDS]
        for flow in finished:
            self._flows.remove(flow)
            if not flow.done.done():
                flow.done.set_result(None)
        self._retime()


class Puller:
    """Runs Pod pull plans and cache builds in simulated time against one shared registry.

    One instance per agent: every Pod pull and cache build shares its :class:`BandwidthPool`.
    ``rng`` supplies jitter and failure draws; with a virtual-time loop (or a fake clock) and a
    seeded ``rng``, the same inputs give the same simulated durations.
    """

    def __init__(
        self,
        settings: PullSettings,
        rng: random.Random,
        clock: Clock | None = None,
        pool: BandwidthPool | None = None,
    ) -> None:
        self._settings = settings
        self._rng = rng
        self._clock: Clock = clock or SystemClock()
        self._pool = pool or BandwidthPool(settings.registry_bandwidth, self._clock, settings.time_scale)
        self._names = itertools.count(1)

    @property
    def settings(self) -> PullSettings:
        return self._settings

    @property
    def pool(self) -> BandwidthPool:
        return self._pool

    async def attach_snapshot(self, plan: PodPullPlan) -> float:
        """Attach the plan's cache snapshot (a cache hit); returns the simulated seconds it took."""
        seconds = snapshot_seconds(plan, self._settings) * self._jitter()
        await self._sleep(seconds)
        return seconds

    async def pull_pod(self, plan: PodPullPlan, on_image_event: ImageEventHandler | None = None) -> PodPullResult:
        """Make a Pod's images present, one image after another, as ``plan`` says.

        Stops at the first image that cannot be made present (``ErrImageNeverPull`` from the plan,
        or ``ErrImagePull`` once injected failures have used up the retries) and returns it as
        ``failure``. ``on_image_event`` is awaited for each ``Pulling``/``Pulled`` as it happens.
        """
        started = self._clock.monotonic()
        group = _Group(f"pod-pull-{next(self._names)}")
        attached = await self.attach_snapshot(plan) if plan.attach_snapshot else 0.0
        outcomes: list[ImagePullOutcome] = []
        failure: PullFailed | None = None
        for step in plan.steps:
            if step.error is not None:
                failure = PullFailed(step.reference, step.error.reason, step.error.message)
                break
            size = step.manifest.size
            if step.action is StepAction.PRESENT:
                outcomes.append(ImagePullOutcome(step.reference, True, step.from_cache, 0.0, 0, 0))
                await _emit(
                    on_image_event,
                    ImagePullEvent(
                        ImagePullEventKind.PULLED, step.reference, step.policy, True, 0.0, 0, size, step.from_cache
                    ),
                )
                continue
            await _emit(
                on_image_event,
                ImagePullEvent(
                    ImagePullEventKind.PULLING, step.reference, step.policy, False, 0.0, 0, size, step.from_cache
                ),
            )
            image_started = self._clock.monotonic()
            attempts = await self._pull_image(step.reference, step.layers_to_fetch, group)
            if isinstance(attempts, PullFailed):
                failure = attempts
                break
            seconds = self._elapsed(image_started)
            outcomes.append(
                ImagePullOutcome(step.reference, False, step.from_cache, seconds, step.bytes_to_fetch, attempts)
            )
            await _emit(
                on_image_event,
                ImagePullEvent(
                    ImagePullEventKind.PULLED,
                    step.reference,
                    step.policy,
                    False,
                    seconds,
                    step.bytes_to_fetch,
                    size,
                    step.from_cache,
                ),
            )
        return PodPullResult(tuple(outcomes), attached, self._elapsed(started), failure)

    def new_group(self, name: str = "pod") -> object:
        """A bandwidth group: the downloads of one Pod (or cache build) share its per-Pod cap."""
        return _Group(f"{name}-{next(self._names)}")

    async def pull_step(self, step: ImagePullStep, group: object) -> ImagePullOutcome | PullFailed:
        """Make one image of a plan present now (the pod worker pulls image by image, as it starts
        containers). ``group`` comes from :meth:`new_group`, one per Pod."""
        if step.error is not None:
            return PullFailed(step.reference, step.error.reason, step.error.message)
        if step.action is StepAction.PRESENT:
            return ImagePullOutcome(step.reference, True, step.from_cache, 0.0, 0, 0)
        started = self._clock.monotonic()
        assert isinstance(group, _Group)
        attempts = await self._pull_image(step.reference, step.layers_to_fetch, group)
        if isinstance(attempts, PullFailed):
            return attempts
        return ImagePullOutcome(
            step.reference, False, step.from_cache, self._elapsed(started), step.bytes_to_fetch, attempts
        )

    async def manifest_round_trip(self) -> float:
        """An ``Always`` pull of an image already present: one manifest round trip (simulated seconds)."""
        seconds = self._settings.manifest_round_trip_seconds * self._jitter()
        await self._sleep(seconds)
        return seconds

    async def pull_for_cache(
        self,
        manifests: Sequence[ImageManifest],
        on_progress: ProgressHandler | None = None,
        *,
        skip_layers: Iterable[str] = (),
    ) -> CacheBuildResult:
        """Pull ``manifests`` into a cache at the build bandwidth, each distinct layer once.

        ``skip_layers`` are digests the build need not fetch (``imc-enable-reuse``: layers already
        in other caches). ``on_progress(done_bytes, total_bytes)`` is awaited once at the start and
        after every layer; keep it quick, it holds up that download slot.
        """
        started = self._clock.monotonic()
        layers = distinct_layers(manifests, skip=frozenset(skip_layers))
        total = sum(layer.size for layer in layers)
        done = 0

        async def progressed(layer: Layer) -> None:
            nonlocal done
            done += layer.size
            if on_progress is not None:
                await on_progress(done, total)

        if on_progress is not None:
            await on_progress(0, total)
        group = _Group(f"cache-build-{next(self._names)}")
        await self._fetch(layers, group, self._settings.cache_build_bandwidth, progressed)
        return CacheBuildResult(self._elapsed(started), done, total)

    async def _pull_image(self, reference: str, layers: tuple[Layer, ...], group: _Group) -> int | PullFailed:
        """Manifest round trip (retried on injected failures), then the layers; returns the attempts."""
        settings = self._settings
        attempts = settings.max_retries + 1
        for attempt in range(1, attempts + 1):
            await self._sleep(settings.manifest_round_trip_seconds * self._jitter())
            failed = settings.failure_probability > 0 and self._rng.random() < settings.failure_probability
            if not failed:
                await self._fetch(layers, group, settings.pod_bandwidth)
                return attempt
            if attempt < attempts:
                await self._sleep(settings.retry_backoff_seconds * 2 ** (attempt - 1))
        return PullFailed(
            reference,
            "ErrImagePull",
            f'Failed to pull image "{reference}": simulated registry failure (injected with probability '
            f"{settings.failure_probability:g}); gave up after {attempts} attempts",
            attempts,
        )

    async def _fetch(
        self,
        layers: Sequence[Layer],
        group: _Group,
        group_cap: float,
        on_layer: Callable[[Layer], Awaitable[None]] | None = None,
    ) -> None:
        """Download ``layers`` (at most ``max_concurrent_layers`` at once, in order) and extract each
        in order once it and the layers before it are in."""
        if not layers:
            return
        settings = self._settings
        # Drawn up front, in layer order, so the draws do not depend on which task runs first.
        factors = [(self._jitter(), self._jitter(), self._jitter()) for _ in layers]
        downloaded = [asyncio.Event() for _ in layers]
        queue = iter(range(len(layers)))

        async def download() -> None:
            for index in queue:
                layer = layers[index]
                round_trip, transfer, _ = factors[index]
                await self._sleep(settings.layer_round_trip_seconds * round_trip)
                await self._pool.transfer(
                    layer.size * transfer,
                    stream_cap=settings.stream_bandwidth,
                    group=group,
                    group_cap=group_cap,
                )
                downloaded[index].set()
                if on_layer is not None:
                    await on_layer(layer)

        async def extract() -> None:
            for index, layer in enumerate(layers):
                await downloaded[index].wait()
                _, _, inflate = factors[index]
                await self._sleep(layer.uncompressed_size / settings.decompression_throughput * inflate)

        async with asyncio.TaskGroup() as tasks:
            for slot in range(min(settings.max_concurrent_layers, len(layers))):
                tasks.create_task(download(), name=f"{group.name}-download-{slot}")
            tasks.create_task(extract(), name=f"{group.name}-extract")

    def _jitter(self) -> float:
        return jitter_factor(self._rng, self._settings.jitter)

    async def _sleep(self, simulated_seconds: float) -> None:
        await self._clock.sleep(simulated_seconds / self._settings.time_scale)

    def _elapsed(self, since: float) -> float:
        return (self._clock.monotonic() - since) * self._settings.time_scale


async def _emit(handler: ImageEventHandler | None, event: ImagePullEvent) -> None:
    if handler is not None:
        await handler(event)
