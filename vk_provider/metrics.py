"""Prometheus metrics of the node, named like the kubelet's, in the text exposition format.

A deliberately small implementation (counters and histograms with labels) so the agent needs no
extra dependency. Bucket boundaries are the kubelet's own (pkg/kubelet/metrics).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

# kubelet: PodStartDuration, PodStartSLIDuration, PodStartTotalDuration
POD_START_BUCKETS = (0.5, 1, 2, 3, 4, 5, 6, 8, 10, 20, 30, 45, 60, 120, 180, 240, 300, 360, 480, 600, 900, 1200,
                     1800, 2700, 3600)  # fmt: skip
# kubelet: ImagePullDuration
IMAGE_PULL_BUCKETS = (0.5, 1, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.labels = name, help, tuple(labels)
        # One without labels has its one sample from the start (0), as Prometheus clients give it.
        self.values: dict[tuple[str, ...], float] = {} if self.labels else {(): 0.0}

    def inc(self, *label_values: str, by: float = 1.0) -> None:
        key = tuple(label_values)
        self.values[key] = self.values.get(key, 0.0) + by

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, value in sorted(self.values.items()):
            out.append(f"{self.name}{_labels(self.labels, key)} {_num(value)}")
        return out


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, value: float, *label_values: str) -> None:
        counts, totals = self.series.setdefault(tuple(label_values), ([0] * (len(self.buckets) + 1), [0.0]))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        totals[0] += value

    def count(self, *label_values: str) -> int:
        found = self.series.get(tuple(label_values))
        return sum(found[0]) if found else 0

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, (counts, totals) in sorted(self.series.items()):
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                running += n
                le = 'le="' + _num(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labels, key, le)} {running}")
            out.append(f"{self.name}_sum{_labels(self.labels, key)} {_num(totals[0])}")
            out.append(f"{self.name}_count{_labels(self.labels, key)} {running}")
        return out


def image_size_bucket(size: int) -> str:
    """The kubelet's ``image_size_in_bytes`` label values."""
    mb = 1024 * 1024
    for limit, label in ((10 * mb, "0-10MB"), (100 * mb, "10MB-100MB"), (500 * mb, "100MB-500MB"),
                         (1024 * mb, "500MB-1GB"), (10 * 1024 * mb, "1GB-10GB")):  # fmt: skip
        if size < limit:
            return label
    return "10GB+"


class NodeMetrics:
    """The node's metrics; implements the http layer's ``MetricsView``. Durations are simulated seconds."""

    def __init__(self) -> None:
        self.pod_start_total = Histogram(
            "kubelet_pod_start_total_duration_seconds",
            "Duration in seconds to start a pod since creation, including time to pull images (simulated).",
            POD_START_BUCKETS,
            ("cache_outcome",),
        )
        self.pod_start_sli = Histogram(
            "kubelet_pod_start_sli_duration_seconds",
            "Duration in seconds to start a pod, excluding time to pull images (simulated).",
            POD_START_BUCKETS,
            ("cache_outcome",),
        )
        self.image_pull = Histogram(
            "kubelet_image_pull_duration_seconds",
            "Duration in seconds to pull an image (simulated).",
            IMAGE_PULL_BUCKETS,
            ("cache_outcome", "image_size_in_bytes"),
        )
        self.cache_hits = Counter("vk_provider_image_cache_hits_total", "Pods that used an ImageCache.", ("kind",))
        self.cache_misses = Counter("vk_provider_image_cache_misses_total", "Automatic matches that found no cache.")
        self.auto_created = Counter(
            "vk_provider_image_cache_auto_created_total", "ImageCaches created automatically after a miss."
        )
        self.bytes_pulled = Counter(
            "vk_provider_image_bytes_pulled_total", "Bytes downloaded by simulated pulls.", ("cache_outcome",)
        )
        self.pods_started = Counter(
            "vk_provider_pods_started_total", "Pods whose containers all started.", ("cache_outcome",)
        )
        self.events_dropped = Counter(
            "vk_provider_events_dropped_total", "Events not posted because too many were waiting (API server behind)."
        )
        self.events_filtered = Counter(
            "vk_provider_events_filtered_total",
            "Events not posted by the spam filter (over 25 of one Pod at once, then one per 5 simulated minutes).",
        )
        self.starts_unrecorded = Counter(
            "vk_provider_pod_starts_unrecorded_total",
            "Pods found running at the agent's start whose start is not in the registry (an agent stopped first).",
        )

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.pod_start_total, self.pod_start_sli, self.image_pull, self.cache_hits, self.cache_misses,
                       self.auto_created, self.bytes_pulled, self.pods_started, self.events_dropped,
                       self.events_filtered, self.starts_unrecorded):  # fmt: skip
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
