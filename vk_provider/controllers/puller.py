"""The puller: executes pull plans in simulated time, sharing the registry between concurrent pulls.

Owns the :class:`BandwidthPool` (fluid, max-min fair sharing of the registry's bandwidth between
every active layer download of every Pod and cache build: whenever a download starts or ends, the
rates are shared out again and the next completion re-timed) and the :class:`Puller`, which runs one Pod's
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
import heapq
import itertools
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

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
    """One active layer download."""

    stream_cap: float
    group: object
    group_cap: float
    done: asyncio.Future[None]
    order: int  # when it joined: flows that finish together are released in this order
    key: float = 0.0  # done when its class's progress reaches this
    entry: int = 0  # its live entry in the class's heap (older entries are stale)
    cls: _Class | None = None  # None once it has left the pool


@dataclass(eq=False, slots=True)
class _Class:
    """The active downloads with one cap: they all move at one rate, so one progress counter and a
    heap of finishing points (in that counter's bytes) stand for all of them."""

    cap: float
    rate: float = 0.0
    progress: float = 0.0  # bytes each member has moved since the class was made (or rebased)
    members: int = 0
    heap: list[tuple[float, int, _Flow]] = field(default_factory=list)

    def head(self) -> _Flow | None:
        """The member that finishes first (dropping stale entries on the way)."""
        heap = self.heap
        while heap:
            _, entry, flow = heap[0]
            if _is_live(self, entry, flow):
                return flow
            heapq.heappop(heap)
        return None


def _is_live(cls: _Class, entry: int, flow: _Flow) -> bool:
    """Whether a heap entry is ``flow``'s current place (not left behind by a move or a departure)."""
    return flow.cls is cls and flow.entry == entry


@dataclass(eq=False, slots=True)
class _Group:
    """Identity of one Pod pull or cache build: its downloads share one bandwidth cap."""

    name: str


class BandwidthPool:
    """The registry's bandwidth, shared max-min fairly by every active layer download.

    Each download is capped by its stream cap and by an equal part of its group's cap (a Pod's
    bandwidth, split between that Pod's active downloads); the registry's ``capacity`` is then
    water-filled between all downloads. Rates change only when a download starts or ends, so the
    pool keeps one timer for the next completion. Bytes and rates are simulated; clock time is
    simulated time / ``time_scale``.

    Downloads with the same cap always get the same rate, and caps take few values (stream cap,
    group cap / 1..max_concurrent_layers), so the pool keeps one class per cap, with a progress
    counter and a heap of finishing points: a start or an end costs O(classes + log downloads), not
    a re-timing of every download (which made thousands of simultaneous pulls quadratic).
    """

    def __init__(self, capacity: float, clock: Clock, time_scale: float = 1.0) -> None:
        self._capacity = capacity
        self._clock = clock
        self._time_scale = time_scale
        self._classes: dict[float, _Class] = {}
        self._groups: dict[object, list[_Flow]] = {}
        self._active = 0
        self._last = 0.0
        self._timer: asyncio.Task[None] | None = None
        self._timer_names = itertools.count()
        self._order = itertools.count()
        self._entries = itertools.count(1)

    @property
    def active_downloads(self) -> int:
        return self._active

    @property
    def allocated(self) -> float:
        """Bytes/s currently handed out (never more than the capacity)."""
        return sum(cls.rate * cls.members for cls in self._classes.values())

    def rates(self, group: object) -> list[float]:
        """The current rates of ``group``'s downloads, in the order they started (for tests and metrics)."""
        return [flow.cls.rate for flow in self._groups.get(group, ()) if flow.cls is not None]

    async def transfer(self, work: float, *, stream_cap: float, group: object, group_cap: float) -> None:
        """Move ``work`` bytes through the pool; returns when they are through.

        Cancelling releases this download's share immediately.
        """
        if work <= 0:
            return
        flow = _Flow(stream_cap, group, group_cap, asyncio.get_running_loop().create_future(), next(self._order))
        self._advance()
        siblings = self._groups.setdefault(group, [])
        siblings.append(flow)
        self._active += 1
        self._place(flow, work)
        self._reclass(siblings)
        self._rebalance()
        try:
            await flow.done
        finally:
            if flow.cls is not None:  # cancelled: leave now
                self._advance()
                self._leave([flow])
                self._rebalance()

    def _advance(self) -> None:
        now = self._clock.monotonic()
        elapsed = (now - self._last) * self._time_scale
        self._last = now
        if elapsed > 0:
            for cls in self._classes.values():
                cls.progress += cls.rate * elapsed

    def _cap(self, flow: _Flow) -> float:
        return min(flow.stream_cap, flow.group_cap / len(self._groups[flow.group]))

    def _place(self, flow: _Flow, remaining: float) -> None:
        """Put ``flow`` (out of any class) into its cap's class with ``remaining`` bytes to go."""
        cap = self._cap(flow)
        cls = self._classes.get(cap)
        if cls is None:
            cls = self._classes[cap] = _Class(cap)
        flow.cls = cls
        flow.key = cls.progress + remaining
        flow.entry = next(self._entries)
        cls.members += 1
        heapq.heappush(cls.heap, (flow.key, flow.entry, flow))

    def _unplace(self, flow: _Flow) -> float:
        """Take ``flow`` out of its class (its heap entry goes stale); returns its bytes to go."""
        cls = flow.cls
        assert cls is not None
        remaining = flow.key - cls.progress
        flow.cls = None
        cls.members -= 1
        if cls.members == 0:
            del self._classes[cls.cap]
        elif len(cls.heap) > 2 * cls.members + 64:
            self._compact(cls)
        return remaining

    @staticmethod
    def _compact(cls: _Class) -> None:
        """Drop the stale entries, and count progress from zero again (keeps the floats small)."""
        live = [
            (key - cls.progress, entry, flow)
            for key, entry, flow in cls.heap
            if flow.cls is cls and flow.entry == entry
        ]
        for key, _, flow in live:
            flow.key = key
        cls.progress = 0.0
        heapq.heapify(live)
        cls.heap = live

    def _reclass(self, flows: Iterable[_Flow]) -> None:
        """Move the ``flows`` whose cap changed (their group grew or shrank) to their new class."""
        for flow in flows:
            if flow.cls is not None and flow.cls.cap != self._cap(flow):
                self._place(flow, self._unplace(flow))

    def _leave(self, flows: Sequence[_Flow]) -> None:
        """Take ``flows`` out of the pool; the rest of their groups get their new caps."""
        touched: dict[object, list[_Flow]] = {}
        for flow in flows:
            self._unplace(flow)
            self._active -= 1
            siblings = self._groups[flow.group]
            siblings.remove(flow)
            if siblings:
                touched[flow.group] = siblings
            else:
                del self._groups[flow.group]
                touched.pop(flow.group, None)
        for siblings in touched.values():
            self._reclass(siblings)

    def _rebalance(self) -> None:
        """Water-fill the capacity between the classes, and time the next completion."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        classes = list(self._classes.values())
        shares = fair_shares([cls.cap for cls in classes], self._capacity, [cls.members for cls in classes])
        for cls, rate in zip(classes, shares, strict=True):
            cls.rate = rate
        first: _Flow | None = None
        soonest = 0.0
        for cls in self._classes.values():
            head = cls.head()
            if head is None or cls.rate <= 0:
                continue
            seconds = (head.key - cls.progress) / cls.rate
            if first is None or seconds < soonest:
                first, soonest = head, seconds
        if first is None:
            return
        delay = max(0.0, soonest) / self._time_scale
        self._timer = asyncio.create_task(
            self._complete_after(first, delay), name=f"bandwidth-pool-timer-{next(self._timer_names)}"
        )

    async def _complete_after(self, first: _Flow, delay: float) -> None:
        await self._clock.sleep(delay)
        # Any change to the pool cancels this timer, so reaching here means ``first`` is done.
        self._timer = None
        self._advance()
        finished = [first]
        for cls in self._classes.values():
            done_within = cls.rate * _DONE_WITHIN_SECONDS
            heap = cls.heap
            while (head := cls.head()) is not None and (head is first or head.key - cls.progress <= done_within):
                heapq.heappop(heap)
                if head is not first:
                    finished.append(head)
        finished.sort(key=lambda flow: flow.order)
        self._leave(finished)
        for flow in finished:
            if not flow.done.done():
                flow.done.set_result(None)
        self._rebalance()


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
