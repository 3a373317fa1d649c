"""The pull model: which bytes a Pod's image pulls move, and how long that takes.

Owns :class:`PullSettings` (every knob of the simulated pull, with defaults anchored on published
numbers; see docs/pull-model.md), the planner :func:`plan_pod_pull` (a Pod's images plus what is
already present → what must be fetched, image by image), the max-min fair share
:func:`fair_shares` that the puller's bandwidth pool applies, and the analytic single-Pod estimator
:func:`estimate_pull_seconds` used by offline simulation and tests.

PURE: stdlib only. No clocks, no I/O, no randomness of its own: jitter comes from a
``random.Random`` the caller passes. Executing a plan on the event loop's clock, with bandwidth
shared between concurrent pulls, is ``vk_provider.controllers.puller``'s job, not this module's.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from vk_provider.domain.model import ImageManifest, Layer

MB = 1_000_000
"""Sizes and bandwidths are in bytes; MB here is 10**6 bytes, as registries and Docker Hub show them."""

CALIBRATION_REFERENCE = "docker.io/library/python:3.12"
"""The catalog image (~386 MB compressed) used to check the defaults against SPEC §5."""
CALIBRATION_MISS_SECONDS = 50.0
"""SPEC §5 (ECI doc): the ~386 MB image starts in about 50 s without a cache..."""
CALIBRATION_HIT_SECONDS = 5.0
"""...and in about 5 s with a cache hit."""


MAX_RETRIES = 1000
"""pull.max_retries at most: the back-off doubles with each try, so 2**1000 seconds is already past any date."""


@dataclass(frozen=True, slots=True)
class PullSettings:
    """Every number of the simulated pull. Durations are simulated seconds, bandwidths bytes/s.

    The defaults reproduce SPEC §5's reference points (see docs/pull-model.md for the derivation):
    the ~386 MB calibration image starts in ~50 s without a cache and ~5 s with a cache hit.

    Two invariants keep "a cache hit is never slower than a miss" true on a fresh instance:
    ``snapshot_attach_seconds <= layer_round_trip_seconds`` and
    ``snapshot_read_bandwidth >= decompression_throughput``; :meth:`problems` does not enforce
    them (a user may want to model a slow snapshot), but the docs say what breaks.
    """

    manifest_round_trip_seconds: float = 1.0
    """Seconds to resolve one image before its layers: auth token, manifest list, manifest and config
    (about four round trips of ~250 ms to a remote registry). Paid by every image that is pulled,
    and by ``Always`` even when every layer is present."""

    layer_round_trip_seconds: float = 0.3
    """Seconds before a layer's first byte: the blob request plus the redirect to blob storage."""

    stream_bandwidth: float = 25 * MB
    """Bytes/s one layer download can reach on its own: ~25 MB/s per layer stream on a registry miss
    (containerd issue 8160)."""

    pod_bandwidth: float = 8.5 * MB
    """Bytes/s a Pod's downloads share (the instance's network towards the registry). Calibrated:
    386 MB in ~45 s of transfer leaves room for the round trips, extraction and start in 50 s."""

    registry_bandwidth: float = 125 * MB
    """Bytes/s the registry serves to all concurrent pulls together, shared max-min fairly (a 1 Gbit/s
    uplink; a decision, not a published number). Fifteen Pods pulling at once saturate it."""

    max_concurrent_layers: int = 3
    """Layers of one image downloading at once (containerd's ``max_concurrent_downloads`` default)."""

    decompression_throughput: float = 360 * MB
    """Uncompressed bytes/s extracting one layer: gzip inflate is single-threaded, ~360 MB/s per core.
    Layers extract one after another, in order, each once its download is done."""

    snapshot_attach_seconds: float = 0.3
    """Fixed seconds to attach a cache's snapshot (a cache hit). Creating the instance's disk is paid
    with or without a cache, so only the extra over an empty disk counts here; kept at or below
    ``layer_round_trip_seconds`` so that a hit never loses to a miss."""

    snapshot_read_bandwidth: float = 360 * MB
    """Uncompressed bytes/s read lazily from the snapshot for the images it provides (roughly an
    ESSD disk's throughput). Calibrated with the two numbers above and ``container_start_seconds``:
    0.3 s + 1.02 GB / 360 MB/s + 1.5 s ≈ 4.6 s for the calibration image."""

    container_start_seconds: float = 1.5
    """Seconds to create and start one container once its image is present (containers start one
    after another)."""

    jitter: float = 0.1
    """Fraction ± by which each round trip, layer transfer and extraction is scaled at random
    (uniform, from the injected seeded generator); 0 turns jitter off."""

    cache_build_bandwidth: float = 50 * MB
    """Bytes/s an ImageCache build downloads at (the cloud build instance's network; a decision)."""

    failure_probability: float = 0.0
    """Probability that one pull attempt of one image fails (failure injection; 0 = never)."""

    max_retries: int = 2
    """Retries after a failed attempt before the pull fails with ``ErrImagePull``."""

    retry_backoff_seconds: float = 10.0
    """Seconds before the first retry, doubling for each further one (the kubelet's initial image
    pull back-off is 10 s)."""

    time_scale: float = 1.0
    """Simulated seconds per second of the event loop's clock: 10 runs a pull ten times faster
    than real time. Every duration the product records stays in simulated seconds."""

    def problems(self) -> tuple[str, ...]:
        """What is wrong with these settings, one clear message each; empty when they are usable."""
        found: list[str] = []
        positive = (
            "stream_bandwidth",
            "pod_bandwidth",
            "registry_bandwidth",
            "decompression_throughput",
            "snapshot_read_bandwidth",
            "cache_build_bandwidth",
            "time_scale",
        )
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                found.append(f"{name} must be a positive number, got {value!r}")
        non_negative = (
            "manifest_round_trip_seconds",
            "layer_round_trip_seconds",
            "snapshot_attach_seconds",
            "container_start_seconds",
            "retry_backoff_seconds",
        )
        for name in non_negative:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                found.append(f"{name} must be zero or more seconds, got {value!r}")
        if self.max_concurrent_layers < 1:
            found.append(f"max_concurrent_layers must be at least 1, got {self.max_concurrent_layers!r}")
        if not 0 <= self.max_retries <= MAX_RETRIES:
            found.append(f"max_retries must be from 0 to {MAX_RETRIES}, got {self.max_retries!r}")
        if not 0 <= self.jitter < 1:
            found.append(f"jitter must be a fraction in [0, 1), got {self.jitter!r}")
        if not 0 <= self.failure_probability <= 1:
            found.append(f"failure_probability must be in [0, 1], got {self.failure_probability!r}")
        return tuple(found)


class PullPolicy(enum.StrEnum):
    """A container's ``imagePullPolicy`` (K8s)."""

    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


@dataclass(frozen=True, slots=True)
class ErrImageNeverPull:
    """A ``Never`` image that is not present: the container cannot start (K8s reason)."""

    reference: str

    @property
    def reason(self) -> str:
        return "ErrImageNeverPull"

    @property
    def message(self) -> str:
        # The kubelet's wording, so users recognise it.
        return f'Container image "{self.reference}" is not present with pull policy of Never'


class StepAction(enum.StrEnum):
    """What the puller does for one image of a Pod."""

    PRESENT = "present"
    """Nothing: the image is present and the policy does not ask for a pull."""
    PULL = "pull"
    """A manifest round trip, then the layers in ``layers_to_fetch`` (possibly none)."""
    NEVER_PULL = "never-pull"
    """Nothing can be done: the image is absent and the policy is ``Never``."""


@dataclass(frozen=True, slots=True)
class ImagePullStep:
    """One image of a Pod (one per container, in start order) and what making it present costs."""

    manifest: ImageManifest
    policy: PullPolicy
    action: StepAction
    from_cache: bool
    """The attached cache holds this image."""
    layers_to_fetch: tuple[Layer, ...] = ()
    """Layers downloaded by this step, in manifest order: not present, not fetched by an earlier step."""
    error: ErrImageNeverPull | None = None

    @property
    def reference(self) -> str:
        return self.manifest.reference

    @property
    def already_present(self) -> bool:
        return self.action is StepAction.PRESENT

    @property
    def bytes_to_fetch(self) -> int:
        return sum(layer.size for layer in self.layers_to_fetch)


@dataclass(frozen=True, slots=True)
class PodPullPlan:
    """How a Pod's images become present: an optional snapshot attach, then each image in order."""

    steps: tuple[ImagePullStep, ...]
    attach_snapshot: bool = False
    """A cache is attached: its snapshot is mounted before any image is pulled."""
    snapshot_layers: tuple[Layer, ...] = ()
    """Layers of the Pod's cached images the snapshot provides (not present before it)."""

    @property
    def errors(self) -> tuple[ErrImageNeverPull, ...]:
        return tuple(step.error for step in self.steps if step.error is not None)

    @property
    def bytes_to_fetch(self) -> int:
        return sum(step.bytes_to_fetch for step in self.steps)

    @property
    def snapshot_bytes(self) -> int:
        """Uncompressed bytes read from the snapshot (the cache-hit cost grows with them)."""
        return sum(layer.uncompressed_size for layer in self.snapshot_layers)


def plan_pod_pull(
    images: Sequence[tuple[ImageManifest, PullPolicy]],
    present_layers: Collection[str],
    cached_images: Collection[str],
) -> PodPullPlan:
    """Plan how a Pod's images become present.

    ``images`` are the Pod's containers' images in start order (init containers first), each with
    its pull policy; ``present_layers`` are digests already on the instance (empty for a fresh ECI
    instance); ``cached_images`` are the normalised references the attached cache holds (empty: no
    cache). References are compared as given, so callers pass normalised ones.

    Rules: the snapshot is attached first, making the cached images' layers present; then images
    are handled one at a time in order (the kubelet never pulls two images of one Pod at once). An
    image is present if the cache holds it, an earlier step pulled it, or all its layers are
    present. ``IfNotPresent`` and ``Never`` skip a present image; ``Always`` pays a manifest round
    trip anyway but downloads only absent layers; ``Never`` on an absent image is an
    :class:`ErrImageNeverPull`. A layer is fetched at most once per Pod.
    """
    cached = frozenset(cached_images)
    present = set(present_layers)
    snapshot_layers: list[Layer] = []
    for manifest, _ in images:
        if manifest.reference in cached:
            for layer in manifest.layers:
                if layer.digest not in present:
                    present.add(layer.digest)
                    snapshot_layers.append(layer)

    pulled: set[str] = set()
    steps: list[ImagePullStep] = []
    for manifest, policy in images:
        from_cache = manifest.reference in cached
        is_present = (
            from_cache or manifest.reference in pulled or all(layer.digest in present for layer in manifest.layers)
        )
        if policy is PullPolicy.NEVER and not is_present:
            steps.append(
                ImagePullStep(
                    manifest,
                    policy,
                    StepAction.NEVER_PULL,
                    from_cache,
                    error=ErrImageNeverPull(manifest.reference),
                )
            )
            continue
        if is_present and policy is not PullPolicy.ALWAYS:
            steps.append(ImagePullStep(manifest, policy, StepAction.PRESENT, from_cache))
            continue
        fetch: list[Layer] = []
        for layer in manifest.layers:
            if layer.digest not in present:
                present.add(layer.digest)
                fetch.append(layer)
        pulled.add(manifest.reference)
        steps.append(ImagePullStep(manifest, policy, StepAction.PULL, from_cache, tuple(fetch)))
    return PodPullPlan(tuple(steps), attach_snapshot=bool(cached), snapshot_layers=tuple(snapshot_layers))


def fair_shares(caps: Sequence[float], capacity: float, counts: Sequence[int] | None = None) -> list[float]:
    """Max-min fair rates for flows with individual ``caps`` sharing ``capacity`` (water-filling).

    A flow never gets more than its cap; what capped flows leave over is shared equally by the rest,
    so N equal flows against a saturated registry each get capacity / N. With ``counts``, entry i
    stands for ``counts[i]`` flows with that cap, and its rate is the rate of each of them.
    """
    weights = [1] * len(caps) if counts is None else counts
    rates = [0.0] * len(caps)
    remaining = max(0.0, capacity)
    left = sum(weights)
    for index in sorted(range(len(caps)), key=lambda i: caps[i]):
        if weights[index] <= 0:
            continue
        rate = min(max(0.0, caps[index]), remaining / left)
        rates[index] = rate
        remaining -= rate * weights[index]
        left -= weights[index]
    return rates


def jitter_factor(rng: random.Random | None, fraction: float) -> float:
    """A multiplier in [1 - fraction, 1 + fraction] drawn from ``rng``; exactly 1 without one."""
    if rng is None or fraction <= 0:
        return 1.0
    return 1.0 + rng.uniform(-fraction, fraction)


def fetch_seconds(layers: Sequence[Layer], settings: PullSettings, bandwidth: float) -> float:
    """Analytic time to download and extract ``layers`` of one image at a Pod ``bandwidth`` (bytes/s).

    Round trips come in waves of ``max_concurrent_layers``; the transfer is bound by the total
    bytes at the aggregate rate or by the largest layer at one stream's rate, whichever is longer;
    the largest layer's extraction follows the transfer (it tends to finish last), unless extracting
    everything in sequence takes longer still. Built only from sums, maxima and counts, so it never
    decreases when a layer grows or is added. Against the fluid puller it is within a few percent
    while the Pod bandwidth binds (the defaults); when one stream's cap binds instead (a cache build,
    a fast Pod) it can be ~20 % low, since a large layer that waits for a free slot finishes late.
    """
    if not layers:
        return 0.0
    k = settings.max_concurrent_layers
    single = min(settings.stream_bandwidth, bandwidth)
    aggregate = min(k * settings.stream_bandwidth, bandwidth)
    total = sum(layer.size for layer in layers)
    largest = max(layer.size for layer in layers)
    largest_unpacked = max(layer.uncompressed_size for layer in layers)
    unpacked = sum(layer.uncompressed_size for layer in layers)
    inflate = settings.decompression_throughput
    round_trips = settings.layer_round_trip_seconds * math.ceil(len(layers) / k)
    transfer = max(total / aggregate, largest / single) + largest_unpacked / inflate
    return round_trips + max(transfer, unpacked / inflate)


def snapshot_seconds(plan: PodPullPlan, settings: PullSettings) -> float:
    """Cost of a cache hit: the fixed attach plus the lazy read of the images it provides."""
    if not plan.attach_snapshot:
        return 0.0
    return settings.snapshot_attach_seconds + plan.snapshot_bytes / settings.snapshot_read_bandwidth


def estimate_pull_seconds(
    plan: PodPullPlan,
    settings: PullSettings,
    concurrent_pulls: int = 1,
    rng: random.Random | None = None,
) -> float:
    """Simulated seconds until the Pod's images are present (or its first image error), analytically.

    ``concurrent_pulls`` Pods (this one included) are assumed to pull alike at the same time, so each
    gets an equal share of ``registry_bandwidth``. With ``rng``, the snapshot step and each pulled
    image are scaled by a jitter factor drawn in plan order, so one seed gives one answer. Failure
    injection is not modelled here (the puller does it).
    """
    bandwidth = min(settings.pod_bandwidth, settings.registry_bandwidth / max(1, concurrent_pulls))
    total = 0.0
    if plan.attach_snapshot:
        total += snapshot_seconds(plan, settings) * jitter_factor(rng, settings.jitter)
    for step in plan.steps:
        if step.action is StepAction.NEVER_PULL:
            break
        if step.action is StepAction.PULL:
            seconds = settings.manifest_round_trip_seconds + fetch_seconds(step.layers_to_fetch, settings, bandwidth)
            total += seconds * jitter_factor(rng, settings.jitter)
    return total


def estimate_pod_start_seconds(
    plan: PodPullPlan,
    settings: PullSettings,
    concurrent_pulls: int = 1,
    rng: random.Random | None = None,
) -> float:
    """Pull time plus creating and starting each container in turn (one per step)."""
    pull = estimate_pull_seconds(plan, settings, concurrent_pulls, rng)
    return pull + settings.container_start_seconds * len(plan.steps)


def distinct_layers(manifests: Iterable[ImageManifest], skip: Collection[str] = ()) -> tuple[Layer, ...]:
    """The layers of ``manifests`` in first-seen order, each digest once, leaving out ``skip``."""
    seen = set(skip)
    layers: list[Layer] = []
    for manifest in manifests:
        for layer in manifest.layers:
            if layer.digest not in seen:
                seen.add(layer.digest)
                layers.append(layer)
    return tuple(layers)
