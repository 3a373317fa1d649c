"""``vk-provider simulate``: the agent's decision and pull code run on a workload file, with no cluster.

Owns the workload file format (version 1, documented in docs/report.md and in the shipped
``config/workload-*.yaml``), its parsing into frozen values with errors that name the file and the
field, and the simulation itself:

- ImageCaches from the file are Ready at their time, or built from then by the real
  :class:`~vk_provider.controllers.puller.Puller` at the build bandwidth plus a snapshot step;
- Pods arrive at given times, at a fixed interval, or as a Poisson process drawn from the seeded
  generator; each is resolved with the pure :func:`~vk_provider.domain.resolver.resolve` (explicit
  and automatic caches, sharing and creating automatic caches on a miss, which become Ready when
  their simulated build ends), planned with :func:`~vk_provider.domain.pullmodel.plan_pod_pull` and
  pulled by the one shared ``Puller``, so concurrent pulls and cache builds share the registry's
  bandwidth exactly as in the agent;
- everything runs on a :class:`~vk_provider.virtualtime.VirtualTimeLoop`, so a simulated day takes
  seconds and one seed always gives the same numbers.

Each started Pod becomes a :class:`~vk_provider.domain.records.PodStartRecord`, and so does a Pod
its cache fails (an explicit cache that is missing or not Ready: outcome ``failed``, as the agent
records it). A Pod whose image cannot be pulled never starts and is not recorded. Both kinds are
listed in :class:`SimulationResult.failures`. The database is written only after the virtual run
(:func:`store`): a database thread the virtual loop waited on would let simulated time leap ahead
meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
import reprlib
import sys
import typing
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vk_provider.catalogs import CatalogError, load_catalogs
from vk_provider.controllers.puller import Puller, PullFailed
from vk_provider.domain.annotations import base36_digest, parse_cache_annotations
from vk_provider.domain.catalog import Catalog, kind_of, manifest_for
from vk_provider.domain.images import InvalidReference, parse_reference
from vk_provider.domain.labels import is_label_value, is_namespace_name, label_problem
from vk_provider.domain.model import CachedImage, CachePhase, ImageCache, ImageManifest
from vk_provider.domain.pullmodel import MAX_RETRIES, PullPolicy, PullSettings, plan_pod_pull
from vk_provider.domain.records import CacheOutcome, ImagePullRecord, PodStartRecord
from vk_provider.domain.resolver import Outcome, PodCacheFacts, Resolution, resolve
from vk_provider.virtualtime import VirtualClock, run_virtual
from vk_provider.yamlfile import YamlFileError, read_yaml

if TYPE_CHECKING:
    from vk_provider.registry.repository import Registry

WORKLOAD_VERSION = 1
GIB = 1024**3
DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)
DEFAULT_SNAPSHOT_SECONDS = 30.0
AUTO_UNUSED_DAYS = 7
"""SPEC §4: an automatic cache never used is deleted 7 days after creation..."""
AUTO_USED_DAYS = 30
"""...and 30 days after its last use otherwise."""
FAILED_CACHE_HOURS = 24
"""SPEC §3: a failed creation expires 24 h later."""
PULL_SHARE = 95
"""Progress reached when a build's pull is done; the snapshot step does the rest (as the agent)."""
MAX_PODS = 1_000_000
MAX_SEED = 2**64 - 1  # it labels the run's Pod starts: a label value is at most 63 characters

_DURATION_RE = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*)+$", re.ASCII)
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", re.ASCII)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h|d)\s*$", re.ASCII)
# A number written as text: YAML 1.1 (PyYAML) reads `1e-3` (no dot) or `1e6` as a string.
_NUMBER_RE = re.compile(r"^\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*$", re.ASCII)
_FLOAT_MAX = int(sys.float_info.max)
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_IMC_ID_RE = re.compile(r"^imc-[a-z0-9]{20}$")


class WorkloadError(ValueError):
    """The workload file cannot be used; the message names the file and every bad field."""


# ---- the workload file -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """An ImageCache of the workload. ``at``: seconds after the start when it appears; with
    ``build`` it is created then and built by the puller, else it is Ready from then."""

    name: str
    imc_id: str
    images: tuple[str, ...]
    size_gib: int = 20
    at: float = 0.0
    build: bool = False
    retention_days: int | None = None
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Arrival:
    """When a group's Pods arrive, in seconds after the workload's start.

    ``times`` given: exactly then. Else from ``start``: ``interval`` apart, or as a Poisson process
    of ``rate`` Pods per second, or all at ``start``.
    """

    start: float = 0.0
    times: tuple[float, ...] | None = None
    interval: float | None = None
    rate: float | None = None

    def times_for(self, count: int, rng: random.Random) -> list[float]:
        if self.times is not None:
            return list(self.times)
        if self.interval is not None:
            return [self.start + self.interval * index for index in range(count)]
        if self.rate is not None:
            moments: list[float] = []
            now = self.start
            for _ in range(count):
                now += rng.expovariate(self.rate)
                moments.append(now)
            return moments
        return [self.start] * count


@dataclass(frozen=True, slots=True)
class PodGroupSpec:
    """``count`` alike Pods (a Deployment's replicas, a Job's completions) named ``name-0`` …"""

    name: str
    images: tuple[str, ...]
    namespace: str = "default"
    count: int = 1
    pull_policy: PullPolicy = PullPolicy.IF_NOT_PRESENT
    annotations: tuple[tuple[str, str], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    arrival: Arrival = field(default_factory=Arrival)


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """A parsed workload file (see docs/report.md for every field)."""

    source: str
    name: str
    pods: tuple[PodGroupSpec, ...]
    caches: tuple[CacheSpec, ...] = ()
    seed: int = 0
    start: datetime = DEFAULT_START
    node: str = "virtual-kubelet"
    default_auto: bool = False
    snapshot_seconds: float = DEFAULT_SNAPSHOT_SECONDS
    catalogs: tuple[str, ...] = ()
    pull: PullSettings = field(default_factory=PullSettings)

    @property
    def pod_count(self) -> int:
        return sum(group.count for group in self.pods)


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel = 2
_SHOWN.maxstring = _SHOWN.maxother = _SHOWN.maxlong = 80
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 4
_SHOWN_LENGTH = 100


def _shown(value: object) -> str:
    """A bad value as an error message quotes it: its repr, cut short. A few lines of YAML aliases
    can make a value of billions of elements, whose whole repr would never be done."""
    text = _SHOWN.repr(value)
    return text if len(text) <= _SHOWN_LENGTH else text[: _SHOWN_LENGTH - 3] + "..."


def _number(value: object) -> float | None:
    """A number from YAML (not a bool), or a string that is one: PyYAML follows YAML 1.1, which
    reads ``1e-3`` (no dot) as a string where JSON and YAML 1.2 read a number. None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and abs(value) > _FLOAT_MAX:  # float() would raise OverflowError
        return math.inf if value > 0 else -math.inf
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and _NUMBER_RE.match(value):
        return float(value)  # "1e400" is inf, refused as not finite
    return None


class _Problems:
    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.found.append(f"{where}: {message}")


def parse_duration(value: object) -> float | None:
    """Seconds from a number or a string like ``90s``, ``1h30m``, ``250ms``, ``2d``; None if invalid
    or negative."""
    number = _number(value)
    if number is not None:
        seconds = number
    elif isinstance(value, str) and _DURATION_RE.match(value):
        seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART_RE.findall(value))
    else:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def parse_rate(value: object) -> float | None:
    """Pods per second from a number (per second) or ``N/s``, ``N/m``, ``N/h``, ``N/d``; None if
    invalid or not positive."""
    number = _number(value)
    if number is not None:
        rate = number
    elif isinstance(value, str) and (found := _RATE_RE.match(value)):
        rate = float(found[1]) / _UNIT_SECONDS[found[2]]
    else:
        return None
    return rate if math.isfinite(rate) and rate > 0 else None


def _labels(raw: object, where: str, problems: _Problems) -> tuple[tuple[str, str], ...]:
    """A label map: strings, each a valid Kubernetes label (report --selector filters on them), and
    none of the run's own (its workload and seed: every Pod start and cache of the run has them)."""
    valid = []
    for key, value in _string_map(raw, where, problems):
        problem = label_problem(key, value)
        if problem:
            problems.add(f"{where}.{key}", f"{problem}, got {key}: {_shown(value)}")
        elif key in RUN_LABELS:
            problems.add(
                f"{where}.{key}",
                "is the run's own label, set by simulate to the workload's name and seed; use another key",
            )
        else:
            valid.append((key, value))
    return tuple(valid)


def _as_label_value(text: str) -> str:
    """``text`` made into a label value: runs of other characters become '-', at most 63 long."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63].strip("-_.")
    return value or "workload"


def _string_map(raw: object, where: str, problems: _Problems) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        problems.add(where, f"must be a mapping of strings, got {kind_of(raw)}")
        return ()
    out: list[tuple[str, str]] = []
    for key, value in raw.items():
        if not isinstance(key, str) or isinstance(value, dict | list) or value is None:
            problems.add(f"{where}.{key}", "keys and values must be strings (quote true/false and numbers)")
            continue
        # YAML turns unquoted true/5 into bool/int; annotations are strings in Kubernetes.
        text = str(value).lower() if isinstance(value, bool) else str(value)
        out.append((key, text))
    return tuple(sorted(out))


def _images(raw: object, where: str, problems: _Problems, maximum: int | None = None) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        problems.add(where, f"must be a non-empty list of image references, got {kind_of(raw)}")
        return ()
    if maximum is not None and len(raw) > maximum:
        problems.add(where, f"at most {maximum} images, got {len(raw)}")
    images: list[str] = []
    for index, image in enumerate(raw):
        if not isinstance(image, str):
            problems.add(f"{where}[{index}]", f"must be an image reference, got {kind_of(image)}")
            continue
        parsed = parse_reference(image)
        if isinstance(parsed, InvalidReference):
            problems.add(f"{where}[{index}]", f"invalid image reference {_shown(image)}: {parsed.reason}")
            continue
        images.append(image)
    return tuple(images)


def _unknown(raw: Mapping[str, Any], allowed: Sequence[str], where: str, problems: _Problems) -> None:
    for key in raw:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            problems.add(f"{prefix}{key}", f"unknown field (expected one of: {', '.join(allowed)})")


def _duration_field(raw: Mapping[str, Any], key: str, where: str, problems: _Problems, default: float) -> float:
    if key not in raw:
        return default
    seconds = parse_duration(raw[key])
    if seconds is None:
        problems.add(
            f"{where}.{key}" if where else key,
            f"must be zero or more seconds (a number, or e.g. '90s', '1h30m'), got {_shown(raw[key])}",
        )
        return default
    return seconds


def _int_field(
    raw: Mapping[str, Any], key: str, where: str, problems: _Problems, default: int, low: int, high: int
) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        problems.add(f"{where}.{key}", f"must be a whole number from {low} to {high}, got {_shown(value)}")
        return default
    return value


def _name_field(raw: Mapping[str, Any], where: str, problems: _Problems) -> str:
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 200:
        problems.add(f"{where}.name", f"must be a lowercase DNS name (a-z, 0-9, '-', '.'), got {_shown(name)}")
        return ""
    return name


def _parse_cache(raw: object, where: str, problems: _Problems) -> CacheSpec | None:
    if not isinstance(raw, dict):
        problems.add(where, f"must be a mapping, got {kind_of(raw)}")
        return None
    _unknown(raw, ("name", "id", "images", "size_gib", "at", "build", "retention_days", "labels"), where, problems)
    name = _name_field(raw, where, problems)
    imc_id = raw.get("id", "imc-" + base36_digest(f"workload cache {name}", 20))
    if not isinstance(imc_id, str) or not _IMC_ID_RE.match(imc_id):
        problems.add(f"{where}.id", f"must be 'imc-' and 20 lowercase letters or digits, got {_shown(imc_id)}")
    build = raw.get("build", False)
    if not isinstance(build, bool):
        problems.add(f"{where}.build", f"must be true or false, got {_shown(build)}")
    retention = raw.get("retention_days")
    if retention is not None and (
        isinstance(retention, bool) or not isinstance(retention, int) or not 1 <= retention <= 65536
    ):
        problems.add(f"{where}.retention_days", f"must be a whole number from 1 to 65536, got {_shown(retention)}")
    return CacheSpec(
        name=name,
        imc_id=imc_id if isinstance(imc_id, str) else "",  # not str(): it may be a huge aliased list
        images=_images(raw.get("images"), f"{where}.images", problems, maximum=20),
        size_gib=_int_field(raw, "size_gib", where, problems, 20, 20, 32768),
        at=_duration_field(raw, "at", where, problems, 0.0),
        build=build is True,
        retention_days=retention if isinstance(retention, int) and not isinstance(retention, bool) else None,
        labels=_labels(raw.get("labels"), f"{where}.labels", problems),
    )


def _parse_arrival(raw: object, count: int | None, where: str, problems: _Problems) -> Arrival:
    if raw is None:
        return Arrival()
    if not isinstance(raw, dict):
        problems.add(where, f"must be a mapping (at, times, interval or rate), got {kind_of(raw)}")
        return Arrival()
    _unknown(raw, ("at", "start", "times", "interval", "rate"), where, problems)
    chosen = [key for key in ("at", "times", "interval", "rate") if key in raw]
    if len(chosen) > 1:
        problems.add(where, f"give one of at, times, interval or rate, not {' and '.join(chosen)}")
    if "at" in raw and "start" in raw:
        problems.add(where, "'at' and 'start' mean the same; give one")
    start = _duration_field(raw, "at" if "at" in raw else "start", where, problems, 0.0)
    if "times" in raw:
        listed = raw["times"]
        if not isinstance(listed, list) or not listed:
            problems.add(f"{where}.times", f"must be a non-empty list of seconds, got {kind_of(listed)}")
            return Arrival(start)
        times: list[float] = []
        for index, value in enumerate(listed):
            seconds = parse_duration(value)
            if seconds is None:
                problems.add(f"{where}.times[{index}]", f"must be zero or more seconds, got {_shown(value)}")
            else:
                times.append(seconds)
        if count is not None and count != len(listed):
            problems.add(f"{where}.times", f"lists {len(listed)} times but count is {count}")
        return Arrival(start, times=tuple(times))
    if "interval" in raw:
        interval = parse_duration(raw["interval"])
        if interval is None:
            problems.add(f"{where}.interval", f"must be zero or more seconds, got {_shown(raw['interval'])}")
        return Arrival(start, interval=interval)
    if "rate" in raw:
        rate = parse_rate(raw["rate"])
        if rate is None:
            problems.add(
                f"{where}.rate",
                f"must be a positive rate (Pods per second, or e.g. '30/m'), got {_shown(raw['rate'])}",
            )
        return Arrival(start, rate=rate or 1.0)
    return Arrival(start)


def _parse_group(raw: object, where: str, problems: _Problems) -> PodGroupSpec | None:
    if not isinstance(raw, dict):
        problems.add(where, f"must be a mapping, got {kind_of(raw)}")
        return None
    _unknown(
        raw,
        ("name", "namespace", "count", "images", "pull_policy", "annotations", "labels", "arrival"),
        where,
        problems,
    )
    name = _name_field(raw, where, problems)
    namespace = raw.get("namespace", "default")
    if not isinstance(namespace, str) or not is_namespace_name(namespace):
        problems.add(
            f"{where}.namespace", f"must be a namespace name (a DNS label: a-z, 0-9, '-'), got {_shown(namespace)}"
        )
        namespace = "default"
    arrival_raw = raw.get("arrival")
    listed = (
        len(arrival_raw["times"])
        if isinstance(arrival_raw, dict) and isinstance(arrival_raw.get("times"), list)
        else None
    )
    count = _int_field(raw, "count", where, problems, listed or 1, 1, MAX_PODS)
    policy_raw = raw.get("pull_policy", PullPolicy.IF_NOT_PRESENT.value)
    if isinstance(policy_raw, str) and policy_raw in {policy.value for policy in PullPolicy}:
        policy = PullPolicy(policy_raw)
    else:  # not PullPolicy(anything) first: its error would quote the whole value
        problems.add(f"{where}.pull_policy", f"must be Always, IfNotPresent or Never, got {_shown(policy_raw)}")
        policy = PullPolicy.IF_NOT_PRESENT
    return PodGroupSpec(
        name=name,
        images=_images(raw.get("images"), f"{where}.images", problems),
        namespace=namespace,
        count=count,
        pull_policy=policy,
        annotations=_string_map(raw.get("annotations"), f"{where}.annotations", problems),
        labels=_labels(raw.get("labels"), f"{where}.labels", problems),
        arrival=_parse_arrival(arrival_raw, count if "count" in raw else None, f"{where}.arrival", problems),
    )


_PULL_FIELDS = tuple(f.name for f in fields(PullSettings) if f.name != "time_scale")
_PULL_TYPES: dict[str, type] = typing.get_type_hints(PullSettings)
_PULL_MAXIMUM = {"max_retries": MAX_RETRIES}


def _parse_pull(raw: object, problems: _Problems) -> PullSettings:
    if raw is None:
        return PullSettings()
    if not isinstance(raw, dict):
        problems.add("pull", f"must be a mapping of pull settings, got {kind_of(raw)}")
        return PullSettings()
    if "time_scale" in raw:
        problems.add("pull.time_scale", "not used by simulate: it runs on virtual time, a day takes seconds")
    _unknown({k: v for k, v in raw.items() if k != "time_scale"}, _PULL_FIELDS, "pull", problems)
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _PULL_FIELDS:
            continue
        if _PULL_TYPES[key] is int:  # by the field's type: a float's default may be a whole number
            maximum = _PULL_MAXIMUM.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or (maximum is not None and value > maximum):
                upto = f" up to {maximum}" if maximum is not None else ""
                problems.add(f"pull.{key}", f"must be a whole number{upto}, got {_shown(value)}")
                continue
            changes[key] = value
        else:
            number = _number(value)
            if number is None:
                problems.add(f"pull.{key}", f"must be a number, got {_shown(value)}")
                continue
            changes[key] = number
    settings = replace(PullSettings(), **changes)
    for problem in settings.problems():
        problems.add("pull", problem)
    return settings


_TOP_FIELDS = (
    "version",
    "name",
    "seed",
    "start",
    "node",
    "default_auto",
    "snapshot_seconds",
    "catalogs",
    "pull",
    "caches",
    "pods",
)


def parse_workload(data: object, source: str = "workload", base_dir: Path | None = None) -> WorkloadSpec:
    """Turn a loaded workload document into a :class:`WorkloadSpec`.

    Raises :class:`WorkloadError` listing every problem as ``SOURCE: field.path: message``.
    Relative ``catalogs`` paths are resolved against ``base_dir`` (the file's directory).
    """
    problems = _Problems()
    if not isinstance(data, dict):
        raise WorkloadError(f"{source}: must be a YAML mapping with 'version: 1' and 'pods', got {kind_of(data)}")
    _unknown(data, _TOP_FIELDS, "", problems)
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version != WORKLOAD_VERSION:  # not true, 1.0
        problems.add("version", f"must be {WORKLOAD_VERSION}, got {_shown(version)}")
    # The name labels the run's Pod starts (vk-provider.io/simulation), so it is a label value;
    # the file's name, when there is none, is made into one.
    name = data.get("name", _as_label_value(Path(source).stem))
    if not isinstance(name, str) or not name or not is_label_value(name):
        problems.add(
            "name",
            f"must be 1-63 letters, digits, '-', '_' or '.', starting and ending alphanumeric, got {_shown(name)}",
        )
        name = "workload"
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        problems.add("seed", f"must be a whole number from 0 to {MAX_SEED}, got {_shown(seed)}")
        seed = 0
    start = _parse_start(data, problems)
    node = data.get("node", "virtual-kubelet")
    if not isinstance(node, str) or not _NAME_RE.match(node):
        problems.add("node", f"must be a lowercase DNS name, got {_shown(node)}")
        node = "virtual-kubelet"
    default_auto = data.get("default_auto", False)
    if not isinstance(default_auto, bool):
        problems.add("default_auto", f"must be true or false, got {_shown(default_auto)}")
        default_auto = False
    snapshot_seconds = _duration_field(data, "snapshot_seconds", "", problems, DEFAULT_SNAPSHOT_SECONDS)
    catalogs_raw = data.get("catalogs", [])
    catalogs: list[str] = []
    if not isinstance(catalogs_raw, list) or not all(isinstance(item, str) for item in catalogs_raw):
        problems.add("catalogs", "must be a list of image catalog file paths")
    else:
        base = base_dir or Path.cwd()
        catalogs = [str(base / item) if not Path(item).is_absolute() else item for item in catalogs_raw]
    pull = _parse_pull(data.get("pull"), problems)

    caches: list[CacheSpec] = []
    caches_raw = data.get("caches", [])
    if not isinstance(caches_raw, list):
        problems.add("caches", f"must be a list, got {kind_of(caches_raw)}")
        caches_raw = []
    for index, raw in enumerate(caches_raw):
        parsed_cache = _parse_cache(raw, f"caches[{index}]", problems)
        if parsed_cache is not None:
            caches.append(parsed_cache)
    _check_unique([(c.name, i) for i, c in enumerate(caches)], "caches", "name", problems)
    _check_unique([(c.imc_id, i) for i, c in enumerate(caches)], "caches", "id", problems)

    groups: list[PodGroupSpec] = []
    pods_raw = data.get("pods")
    if not isinstance(pods_raw, list) or not pods_raw:
        problems.add("pods", f"must be a non-empty list of Pod groups, got {kind_of(pods_raw)}")
        pods_raw = []
    for index, raw in enumerate(pods_raw):
        group = _parse_group(raw, f"pods[{index}]", problems)
        if group is not None:
            groups.append(group)
            # The agent posts these as InvalidImageCacheAnnotation Warnings and goes on; a workload
            # file is the user's own experiment, so they are errors here, not silently ignored.
            for problem in parse_cache_annotations(dict(group.annotations), default_auto).problems:
                problems.add(f"pods[{index}].annotations", problem.removesuffix("; ignored"))
    _check_unique([(f"{g.namespace}/{g.name}", i) for i, g in enumerate(groups)], "pods", "name", problems)
    total = sum(group.count for group in groups)
    if total > MAX_PODS:
        problems.add("pods", f"{total} Pods in all; at most {MAX_PODS}")
    elif not problems.found:  # the Pods' own names (<group>-<i>) may meet another group's
        owner: dict[tuple[str, str], int] = {}
        for i, g in enumerate(groups):
            for pod in pod_names(g):
                first = owner.setdefault((g.namespace, pod), i)
                if first != i:
                    problems.add(f"pods[{i}]", f"its Pod {g.namespace}/{pod} has the name of a Pod of pods[{first}]")
                    break
    if problems.found:
        raise WorkloadError(f"{source}: " + "; ".join(problems.found))
    return WorkloadSpec(
        source=source,
        name=name,
        pods=tuple(groups),
        caches=tuple(caches),
        seed=seed,
        start=start,
        node=node,
        default_auto=default_auto,
        snapshot_seconds=snapshot_seconds,
        catalogs=tuple(catalogs),
        pull=pull,
    )


def _parse_start(data: Mapping[str, Any], problems: _Problems) -> datetime:
    """The workload's ``start``, in UTC (a time without a zone is taken as UTC)."""
    if "start" not in data:
        return DEFAULT_START
    raw = data["start"]
    try:
        if isinstance(raw, datetime):  # YAML reads an unquoted timestamp itself
            start = raw
        elif isinstance(raw, date):
            start = datetime(raw.year, raw.month, raw.day)
        elif isinstance(raw, str):
            start = datetime.fromisoformat(raw)
        else:
            raise ValueError(raw)
        return start.replace(tzinfo=UTC) if start.tzinfo is None else start.astimezone(UTC)
    except ValueError:
        problems.add("start", f"must be an ISO 8601 time such as 2026-01-01T00:00:00Z, got {_shown(raw)}")
    except OverflowError:  # its zone's offset takes it out of the years 1 to 9999 in UTC
        written = raw.isoformat() if isinstance(raw, date) else raw
        problems.add("start", f"must be from year 1 to year 9999 once in UTC, got {_shown(written)}")
    return DEFAULT_START


def _check_unique(values: Sequence[tuple[str, int]], where: str, key: str, problems: _Problems) -> None:
    seen: dict[str, int] = {}
    for value, index in values:
        if value and value in seen:
            problems.add(f"{where}[{index}].{key}", f"{_shown(value)} is already used by {where}[{seen[value]}]")
        seen.setdefault(value, index)


def load_workload(path: str | Path) -> WorkloadSpec:
    """Read and parse a workload file; every problem is a :class:`WorkloadError` naming the file."""
    file = Path(path)
    try:
        data = read_yaml(file, "workload file")
    except YamlFileError as exc:
        raise WorkloadError(str(exc)) from None
    return parse_workload(data, source=str(path), base_dir=file.resolve().parent)


def load_workload_catalog(workload: WorkloadSpec) -> Catalog:
    """The shipped image catalog plus the workload's own catalog files."""
    try:
        return load_catalogs("", list(workload.catalogs), strict=True)
    except CatalogError as exc:
        raise WorkloadError(f"{workload.source}: catalogs: {exc}") from None


# ---- the simulation ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PodFailure:
    """A Pod of the workload that never started, with the Kubernetes reason; ``recorded`` when it is
    among the records as well (a cache failure, outcome ``failed``), not for a pull that never worked."""

    namespace: str
    name: str
    reason: str
    message: str
    at: datetime
    recorded: bool = False


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """What a run produced: Pod starts (by start time), final caches, cache hits to count, Pods that
    failed, the manifests used, and the simulated seconds until the last Pod started."""

    workload: WorkloadSpec
    seed: int
    records: tuple[PodStartRecord, ...]
    caches: tuple[ImageCache, ...]
    hits: tuple[tuple[str, datetime, str], ...]  # (cache id, when, the Pod's UID)
    failures: tuple[PodFailure, ...]
    manifests: tuple[ImageManifest, ...]
    simulated_seconds: float


@dataclass(frozen=True, slots=True)
class _PodArrival:
    at: float
    group: PodGroupSpec
    index: int


# Every Pod start of a run carries these labels: which workload and seed (so `report -l
# vk-provider.io/simulation=NAME` picks one workload out of a shared database, and a re-run
# replaces its earlier run).
SIMULATION_LABEL = "vk-provider.io/simulation"
SIMULATION_SEED_LABEL = "vk-provider.io/simulation-seed"
RUN_LABELS = (SIMULATION_LABEL, SIMULATION_SEED_LABEL)


def run_labels(workload: WorkloadSpec, seed: int) -> dict[str, str]:
    return {SIMULATION_LABEL: workload.name, SIMULATION_SEED_LABEL: str(seed)}


def pod_uid(workload: WorkloadSpec, seed: int, namespace: str, name: str) -> str:
    """A stable UID: the same workload and seed give the same Pods (a run again replaces them)."""
    digest = hashlib.sha256(f"{workload.name}\0{seed}\0{namespace}\0{name}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def _outcome(resolution: Resolution) -> CacheOutcome:
    if resolution.outcome.is_failure:
        return CacheOutcome.FAILED
    if resolution.outcome is Outcome.NO_CACHE:
        return CacheOutcome.NONE
    if resolution.outcome is Outcome.MISS:
        return CacheOutcome.MISS
    if resolution.images_to_pull:
        return CacheOutcome.PARTIAL
    return CacheOutcome.EXPLICIT_HIT if resolution.outcome is Outcome.EXPLICIT_HIT else CacheOutcome.AUTO_HIT


class _Simulation:
    """One run on the virtual loop. Resolution and cache creation happen in arrival order on one
    task (the resolver's contract: a cache it asks for is visible to the next resolve)."""

    def __init__(self, workload: WorkloadSpec, catalog: Catalog, seed: int) -> None:
        self.workload = workload
        self.seed = seed
        self.catalog = catalog
        self.clock = VirtualClock(workload.start)
        self.settings = replace(workload.pull, time_scale=1.0)
        self.puller = Puller(self.settings, random.Random(seed), self.clock)
        self.caches: dict[str, ImageCache] = {}
        self.manifests: dict[str, ImageManifest] = {}
        self.records: list[PodStartRecord] = []
        self.hits: list[tuple[str, datetime, str]] = []
        self.failures: list[PodFailure] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.run_labels = tuple(run_labels(workload, seed).items())

    def manifest(self, reference: str) -> ImageManifest:
        found = manifest_for(self.catalog, reference, self.seed)
        if found is None:  # pragma: no cover - references are validated when the file is parsed
            raise WorkloadError(f"{self.workload.source}: invalid image reference {reference!r}")
        self.manifests.setdefault(found.reference, found)
        return self.manifests[found.reference]

    def labelled(self, labels: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        """``labels`` with the run's own (its workload and seed) in place of any of the same keys."""
        return (*((key, value) for key, value in labels if key not in RUN_LABELS), *self.run_labels)

    def extracted_size(self, references: Sequence[str]) -> int:
        """Bytes a cache of these images holds, as the agent's cache controller counts them: the
        snapshot holds extracted layers, so the distinct layers' uncompressed size."""
        layers = {layer.digest: layer for ref in references for layer in self.manifest(ref).layers}
        return sum(layer.uncompressed_size for layer in layers.values())

    def cached_images(self, references: Sequence[str]) -> tuple[CachedImage, ...]:
        images: dict[str, CachedImage] = {}
        for reference in references:
            manifest = self.manifest(reference)
            images.setdefault(manifest.reference, CachedImage(manifest.reference, manifest.size, manifest.digest))
        return tuple(images.values())

    def arrivals(self) -> list[_PodArrival]:
        rng = random.Random(f"vk-provider simulate arrivals {self.seed}")
        arrivals: list[_PodArrival] = []
        for group in self.workload.pods:
            for index, moment in enumerate(group.arrival.times_for(group.count, rng)):
                arrivals.append(_PodArrival(moment, group, index))
        # Stable: equal times keep file order, so one seed gives one order.
        arrivals.sort(key=lambda arrival: arrival.at)
        return arrivals

    async def run(self) -> SimulationResult:
        loop = asyncio.get_running_loop()
        for index, spec in enumerate(self.workload.caches):
            needed = 0 if spec.build else self.extracted_size(spec.images)
            if needed > spec.size_gib * GIB:  # Ready from the start: its images must fit
                raise WorkloadError(
                    f"{self.workload.source}: caches[{index}] ({spec.name}): its images need {needed / GIB:.1f} GiB "
                    f"extracted, more than its size_gib of {spec.size_gib}: a cache that is not built must hold "
                    "them (raise size_gib, or set build: true to see its build fail as on ECI)"
                )
        for spec in sorted(self.workload.caches, key=lambda spec: spec.at):
            if spec.at <= 0:
                self.add_cache(spec)
            else:
                loop.call_at(spec.at, self.add_cache, spec)
        for arrival in self.arrivals():
            await asyncio.sleep(max(0.0, arrival.at - loop.time()))
            self.arrive(arrival)
        while self.tasks:
            pending, self.tasks = self.tasks, []
            await asyncio.gather(*pending)
        last_start = max((record.started_at for record in self.records), default=self.workload.start)
        records = sorted(self.records, key=lambda record: (record.started_at, record.namespace, record.name))
        return SimulationResult(
            workload=self.workload,
            seed=self.seed,
            records=tuple(records),
            caches=tuple(sorted(self.caches.values(), key=lambda cache: cache.name)),
            hits=tuple(self.hits),
            failures=tuple(self.failures),
            manifests=tuple(self.manifests[key] for key in sorted(self.manifests)),
            simulated_seconds=(last_start - self.workload.start).total_seconds(),
        )

    def add_cache(self, spec: CacheSpec) -> None:
        now = self.clock.now()
        expires = now + timedelta(days=spec.retention_days) if spec.retention_days else None
        cache = ImageCache(
            imc_id=spec.imc_id,
            name=spec.name,
            phase=CachePhase.CREATING if spec.build else CachePhase.READY,
            size_gib=spec.size_gib,
            images=self.cached_images(spec.images),
            automatic=False,
            created_at=now,
            progress=0 if spec.build else 100,
            expires_at=expires,
            labels=self.labelled(spec.labels),
        )
        self.caches[cache.name] = cache
        if spec.build:
            self.spawn(self.build(cache.name), f"build:{cache.name}")

    def spawn(self, work: Any, name: str) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(work, name=name))

    def update_cache(self, name: str, **changes: Any) -> None:
        self.caches[name] = replace(self.caches[name], **changes)

    async def build(self, name: str) -> None:
        """Pull the cache's images at the build bandwidth (sharing the registry), then snapshot."""
        cache = self.caches[name]
        manifests = [self.manifest(image.reference) for image in cache.images]
        needed = self.extracted_size([image.reference for image in cache.images])
        if needed > cache.size_gib * GIB:
            self.update_cache(
                name,
                phase=CachePhase.FAILED,
                message=f"the images need {needed / GIB:.1f} GiB, more than the cache's imageCacheSize "
                f"of {cache.size_gib} GiB",
                expires_at=self.clock.now() + timedelta(hours=FAILED_CACHE_HOURS),
            )
            return

        async def progressed(done: int, total: int) -> None:
            self.update_cache(name, progress=PULL_SHARE * done // total if total else PULL_SHARE)

        await self.puller.pull_for_cache(manifests, progressed)
        await self.clock.sleep(self.workload.snapshot_seconds)
        self.update_cache(name, phase=CachePhase.READY, progress=100)

    def arrive(self, arrival: _PodArrival) -> None:
        group = arrival.group
        name = pod_name(group, arrival.index)
        uid = pod_uid(self.workload, self.seed, group.namespace, name)
        now = self.clock.now()
        manifests = [self.manifest(image) for image in group.images]
        resolution = resolve(
            PodCacheFacts(uid, group.namespace, name, dict(group.annotations), group.images),
            list(self.caches.values()),
            now,
            default_auto=self.workload.default_auto,
            image_sizes={manifest.reference: manifest.size for manifest in manifests},
        )
        if resolution.outcome.is_failure:
            reason = resolution.failure_reason or resolution.outcome.value
            self.failures.append(PodFailure(group.namespace, name, reason, resolution.explanation, now, recorded=True))
            # Recorded like the agent records it: outcome failed, nothing pulled, failed at once.
            imc_id = resolution.request.explicit_id or None
            self.record(group, uid, name, resolution, CacheOutcome.FAILED, imc_id, created=now, started=now)
            return
        cache = resolution.cache
        if cache is not None and resolution.outcome.is_hit:
            self.hits.append((cache.imc_id, now, uid))
            changes: dict[str, Any] = {"last_matched_at": now}
            if cache.automatic:
                changes["expires_at"] = now + timedelta(days=AUTO_USED_DAYS)
            self.update_cache(cache.name, **changes)
        if resolution.auto_create is not None:
            spec = resolution.auto_create
            self.caches[spec.name] = ImageCache(
                imc_id=spec.imc_id,
                name=spec.name,
                phase=CachePhase.CREATING,
                size_gib=spec.size_gib,
                images=self.cached_images(spec.images),
                automatic=True,
                created_at=now,
                expires_at=now + timedelta(days=AUTO_UNUSED_DAYS),
                labels=self.run_labels,
            )
            self.spawn(self.build(spec.name), f"build:{spec.name}")
        self.spawn(self.start_pod(arrival, name, uid, manifests, resolution), f"pod:{group.namespace}/{name}")

    async def start_pod(
        self,
        arrival: _PodArrival,
        name: str,
        uid: str,
        manifests: Sequence[ImageManifest],
        resolution: Resolution,
    ) -> None:
        """Attach the cache's snapshot, then per container: make its image present, start it."""
        group = arrival.group
        created = self.clock.now()
        covered = resolution.covered_images if resolution.outcome.is_hit else ()
        plan = plan_pod_pull([(manifest, group.pull_policy) for manifest in manifests], (), covered)
        attach = await self.puller.attach_snapshot(plan) if plan.attach_snapshot else 0.0
        pod_group = self.puller.new_group(name)
        images: list[ImagePullRecord] = []
        container_seconds = 0.0
        for step in plan.steps:
            pulled = await self.puller.pull_step(step, pod_group)
            if isinstance(pulled, PullFailed):
                self.failures.append(PodFailure(group.namespace, name, pulled.reason, pulled.message, self.clock.now()))
                return
            images.append(ImagePullRecord(step.reference, pulled.bytes_downloaded, pulled.seconds, step.from_cache))
            await self.clock.sleep(self.settings.container_start_seconds)
            container_seconds += self.settings.container_start_seconds
        cache = resolution.cache
        imc_id = cache.imc_id if cache is not None else None
        self.record(
            group, uid, name, resolution, _outcome(resolution), imc_id, created=created, started=self.clock.now(),
            images=tuple(images), attach=attach, container_seconds=container_seconds,
        )  # fmt: skip

    def record(
        self,
        group: PodGroupSpec,
        uid: str,
        name: str,
        resolution: Resolution,
        outcome: CacheOutcome,
        imc_id: str | None,
        *,
        created: datetime,
        started: datetime,
        images: tuple[ImagePullRecord, ...] = (),
        attach: float = 0.0,
        container_seconds: float = 0.0,
    ) -> None:
        self.records.append(
            PodStartRecord(
                pod_uid=uid,
                namespace=group.namespace,
                name=name,
                node=self.workload.node,
                outcome=outcome,
                imc_id=imc_id,
                reason=resolution.explanation,
                images=images,
                resolve_seconds=0.0,
                snapshot_attach_seconds=attach,
                container_start_seconds=container_seconds,
                startup_seconds=(started - created).total_seconds(),
                created_at=created,
                started_at=started,
                labels=self.labelled(group.labels),
            )
        )


def simulate(workload: WorkloadSpec, catalog: Catalog | None = None, *, seed: int | None = None) -> SimulationResult:
    """Run ``workload`` on virtual time; ``seed`` (default: the file's) drives jitter, failure
    injection and Poisson arrivals. Same workload, catalog and seed: same result."""
    chosen = workload.seed if seed is None else seed
    simulation = _Simulation(workload, catalog if catalog is not None else load_workload_catalog(workload), chosen)
    # Virtual time stops at the year 9999 (or at infinity, where it would spin for ever: a rate or
    # bandwidth so small that a duration overflows, a back-off doubled too often).
    limit = (datetime.max.replace(tzinfo=UTC) - workload.start).total_seconds()
    try:
        return run_virtual(simulation.run, limit=limit)
    except OverflowError:  # a timestamp past datetime's range, or virtual time stopped there
        raise WorkloadError(
            f"{workload.source}: simulated time runs past the year 9999 (start {workload.start:%Y-%m-%d} "
            "plus the arrivals and durations); use an earlier start or shorter times"
        ) from None


def pod_name(group: PodGroupSpec, index: int) -> str:
    """The name of a group's ``index``-th Pod: the group's own name when it has one Pod."""
    return group.name if group.count == 1 else f"{group.name}-{index}"


def pod_names(group: PodGroupSpec) -> Iterator[str]:
    return (pod_name(group, i) for i in range(group.count))


@dataclass(frozen=True, slots=True)
class StoreSummary:
    recorded: int
    replaced: int  # Pod starts of an earlier run of the same workload and seed, deleted first


async def store(result: SimulationResult, db: str) -> StoreSummary:
    """Write a run into the registry at ``db`` (upgraded to the newest schema first), in one
    transaction (all of it, or on an error or Ctrl-C none of it): manifests, caches, Pod starts and
    cache hits. An earlier run of the same workload and seed on this database is replaced: its Pod
    starts are deleted, their hits come off the caches' counts, and the automatic caches it made
    that nothing else used go. Raises CacheNameTakenError (nothing written) when a workload cache
    would change a cache that other Pod starts used."""
    from vk_provider.registry import migrate, open_registry

    await migrate.upgrade(db)
    registry = await open_registry(db)
    try:
        async with registry.transaction():
            labels = run_labels(result.workload, result.seed)
            # By label, and by UID for starts stored before runs were labelled (the same UIDs).
            replaced = await registry.forget_pod_starts([record.pod_uid for record in result.records], labels=labels)
            await _check_caches(registry, result)
            await registry.forget_unused_caches(labels, keep=[cache.name for cache in result.caches])
            for manifest in result.manifests:
                await registry.save_manifest(manifest, resolved_at=result.workload.start)
            end = result.workload.start + timedelta(seconds=result.simulated_seconds)
            await registry.upsert_caches(result.caches, now=end)
            recorded = 0
            for start in range(0, len(result.records), 500):
                recorded += sum(await registry.record_pod_starts(result.records[start : start + 500]))
            # One write per cache: its hit count grows by its hits, its last match is the last one.
            # Only the hits of Pods with a record: those are what replacing this run takes back.
            started = {record.pod_uid for record in result.records}
            hits: dict[str, tuple[int, datetime]] = {}
            for imc_id, moment, uid in result.hits:
                if uid in started:
                    hits[imc_id] = (hits.get(imc_id, (0, moment))[0] + 1, moment)
            for imc_id, (count, last) in hits.items():
                await registry.mark_cache_matched(imc_id, last, count=count)
    finally:
        await registry.close()
    return StoreSummary(recorded=recorded, replaced=replaced)


class CacheNameTakenError(ValueError):
    """A workload cache would change a cache in the database that other Pod starts used."""


async def _check_caches(registry: Registry, result: SimulationResult) -> None:
    """Refuse a workload cache that would change a cache other Pod starts used (another workload's,
    another seed's, an agent's): its ID, images or size. Their hits would then count for a cache
    they never used. A cache nobody else used may change; an identical one is shared."""
    for cache in result.caches:
        if cache.automatic:
            continue  # named after this run's Pods
        by_id = await registry.get_cache_by_id(cache.imc_id)
        if by_id is not None and by_id.name != cache.name:
            if not await registry.pod_starts_by_label(by_id.imc_id, RUN_LABELS):
                await registry.delete_cache(by_id.name)  # renamed, and no other run's Pods used it
                continue
            raise CacheNameTakenError(
                f"cache {cache.name!r} has the id {cache.imc_id}, which cache {by_id.name!r} has in the database: "
                "give it another id (or none, to derive one from its name), or use another --db"
            )
        stored = await registry.get_cache_by_name(cache.name)
        if stored is None:
            continue
        held = sorted(image.reference for image in stored.images)
        if (stored.imc_id, held, stored.size_gib) == (
            cache.imc_id, sorted(image.reference for image in cache.images), cache.size_gib
        ):  # fmt: skip
            continue
        users = await registry.pod_starts_by_label(stored.imc_id, RUN_LABELS)
        if users:
            who = ", ".join(
                f"{count} of workload {name!r} (seed {seed})" if name is not None else f"{count} of an agent"
                for (name, seed), count in sorted(users.items(), key=lambda item: str(item[0]))
            )
            raise CacheNameTakenError(
                f"cache {cache.name!r} is already in the database as {stored.imc_id} holding "
                f"{', '.join(held) or 'no images'} ({stored.size_gib} GiB), and Pod starts used it ({who}): "
                "give this workload's cache another name, or use another --db"
            )


def summary_lines(result: SimulationResult, stored: StoreSummary | None = None) -> list[str]:
    """A few human lines about the run (printed before the report in text mode)."""
    workload = result.workload
    lines = [
        f"simulated {workload.pod_count} Pods of {workload.source} (seed {result.seed}) over "
        f"{result.simulated_seconds:.0f} simulated seconds: "
        f"{sum(1 for r in result.records if r.outcome is not CacheOutcome.FAILED)} started, "
        f"{len(result.failures)} failed",
    ]
    automatic = [cache for cache in result.caches if cache.automatic]
    if automatic:
        ready = sum(1 for cache in automatic if cache.is_ready())
        lines.append(f"automatic caches created: {len(automatic)} ({ready} Ready at the end)")
    reasons: dict[tuple[str, bool], int] = {}
    for failure in result.failures:
        key = (failure.reason, failure.recorded)
        reasons[key] = reasons.get(key, 0) + 1
    if reasons:
        shown = ", ".join(
            f"{count} {reason}" + (" (recorded as failed)" if recorded else " (never started, not recorded)")
            for (reason, recorded), count in sorted(reasons.items())
        )
        lines.append(f"failed Pods: {shown}")
    if stored is not None and stored.replaced:
        lines.append(
            f"replaced the {stored.replaced} Pod starts of an earlier run of workload {workload.name!r} "
            f"(seed {result.seed}) in the database"
        )
    return lines
