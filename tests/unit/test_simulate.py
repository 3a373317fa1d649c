"""``vk-provider simulate``: workload parsing, and the domain code run on virtual time.

Durations asserted are SIMULATED seconds; nothing here waits in real time.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import reprlib
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from vk_provider import cli
from vk_provider.domain.catalog import Catalog
from vk_provider.domain.model import CachePhase
from vk_provider.domain.records import CacheOutcome
from vk_provider.report import build_comparison
from vk_provider.simulate import (
    Arrival,
    CacheNameTakenError,
    SimulationResult,
    WorkloadError,
    WorkloadSpec,
    load_workload,
    load_workload_catalog,
    parse_duration,
    parse_rate,
    parse_workload,
    simulate,
    store,
    summary_lines,
)
from vk_provider.virtualtime import VirtualTimeOverflow, run_virtual

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = sorted((ROOT / "config").glob("*workload*.yaml"))
AUTO = {"k8s.aliyun.com/eci-auto-imc": "true"}
EXPLICIT = {"k8s.aliyun.com/eci-imc-id": "imc-nginxcache0000000000"}
NO_JITTER = {"jitter": 0.0}


def workload(pods: list[dict[str, Any]], **top: Any) -> WorkloadSpec:
    return parse_workload({"version": 1, "name": "t", "pods": pods, **top}, source="w.yaml")


_CATALOG: Catalog | None = None


def catalog() -> Catalog:
    global _CATALOG
    if _CATALOG is None:
        _CATALOG = load_workload_catalog(workload([{"name": "x", "images": ["busybox:1.36"]}]))
    return _CATALOG


def run(spec: WorkloadSpec, seed: int | None = None) -> SimulationResult:
    return simulate(spec, catalog(), seed=seed)


def outcomes(result: SimulationResult) -> dict[str, CacheOutcome]:
    return {record.name: record.outcome for record in result.records}


# ---- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(0, 0.0), (2.5, 2.5), ("90s", 90.0), ("1h30m", 5400.0), ("250ms", 0.25), ("2d", 172800.0), ("1.5m", 90.0)],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [-1, "soon", "5 parsecs", True, None, [], float("inf"), "h", "\uff19\uff10s"])
def test_bad_durations(value: object) -> None:
    assert parse_duration(value) is None


@pytest.mark.parametrize(
    ("value", "rate"), [(2, 2.0), ("30/m", 0.5), ("3600/h", 1.0), ("0.5/s", 0.5), ("86400/d", 1.0)]
)
def test_rates(value: object, rate: float) -> None:
    assert parse_rate(value) == rate


@pytest.mark.parametrize("value", [0, -1, "fast", "3/week", False, "0/s", "\uff13/s"])
def test_bad_rates(value: object) -> None:
    assert parse_rate(value) is None


@pytest.mark.parametrize("path", WORKLOADS, ids=lambda path: path.name)
def test_shipped_workloads_parse(path: Path) -> None:
    spec = load_workload(path)
    assert spec.pod_count > 0
    assert spec.source == str(path)


def test_shipped_workloads_are_there() -> None:
    names = {path.name for path in WORKLOADS}
    assert {"workload-seed.yaml", "workload-burst.yaml"} <= names
    assert load_workload(ROOT / "config" / "workload-burst.yaml").pod_count == 1000


GOOD_POD: dict[str, Any] = {"name": "web", "images": ["nginx:1.27"]}
HOURS_5 = timedelta(hours=5)


@pytest.mark.parametrize(
    ("document", "needle"),
    [
        ([], "w.yaml: must be a YAML mapping"),
        ({"version": 2, "pods": [GOOD_POD]}, "version: must be 1, got 2"),
        ({"version": 1}, "pods: must be a non-empty list"),
        ({"version": 1, "pods": [GOOD_POD], "colour": "red"}, "colour: unknown field"),
        ({"version": 1, "pods": [{"name": "Web!", "images": ["nginx"]}]}, "pods[0].name: must be a lowercase DNS name"),
        ({"version": 1, "pods": [{"name": "web"}]}, "pods[0].images: must be a non-empty list"),
        (
            {"version": 1, "pods": [{"name": "web", "images": ["NGINX:1"]}]},
            "pods[0].images[0]: invalid image reference",
        ),
        ({"version": 1, "pods": [{**GOOD_POD, "count": 0}]}, "pods[0].count: must be a whole number from 1"),
        ({"version": 1, "pods": [{**GOOD_POD, "pull_policy": "Sometimes"}]}, "pods[0].pull_policy: must be Always"),
        (
            {"version": 1, "pods": [{**GOOD_POD, "arrival": {"rate": -2}}]},
            "pods[0].arrival.rate: must be a positive rate",
        ),
        ({"version": 1, "pods": [{**GOOD_POD, "arrival": {"interval": "often"}}]}, "pods[0].arrival.interval"),
        ({"version": 1, "pods": [{**GOOD_POD, "arrival": {"rate": 1, "interval": 2}}]}, "give one of at, times"),
        (
            {"version": 1, "pods": [{**GOOD_POD, "count": 3, "arrival": {"times": [0, 1]}}]},
            "lists 2 times but count is 3",
        ),
        ({"version": 1, "pods": [{**GOOD_POD, "arrival": {"times": [0, "x"]}}]}, "pods[0].arrival.times[1]"),
        ({"version": 1, "pods": [{**GOOD_POD, "annotations": {"a": {"b": 1}}}]}, "pods[0].annotations.a"),
        ({"version": 1, "pods": [GOOD_POD, GOOD_POD]}, "pods[1].name: 'default/web' is already used by pods[0]"),
        (
            {"version": 1, "pods": [GOOD_POD], "caches": [{"name": "c", "images": ["nginx"], "id": "imc-x"}]},
            "caches[0].id",
        ),
        (
            {"version": 1, "pods": [GOOD_POD], "caches": [{"name": "c", "images": ["nginx"], "size_gib": 5}]},
            "caches[0].size_gib",
        ),
        ({"version": 1, "pods": [GOOD_POD], "caches": [{"name": "c", "images": ["a"] * 21}]}, "at most 20 images"),
        ({"version": 1, "pods": [GOOD_POD], "pull": {"jitter": 2}}, "pull: jitter must be a fraction"),
        ({"version": 1, "pods": [GOOD_POD], "pull": {"warp": 9}}, "pull.warp: unknown field"),
        ({"version": 1, "pods": [GOOD_POD], "pull": {"time_scale": 10}}, "pull.time_scale: not used by simulate"),
        ({"version": 1, "pods": [GOOD_POD], "start": "noon"}, "start: must be an ISO 8601 time"),
        ({"version": 1, "pods": [GOOD_POD], "seed": "x"}, "seed: must be a whole number"),
        # What the report's --namespace and --selector could never pick out is refused up front.
        ({"version": 1, "pods": [GOOD_POD], "seed": -1}, "seed: must be a whole number from 0 to 18446744073709551615"),
        ({"version": 1, "pods": [GOOD_POD], "seed": 2**64}, "seed: must be a whole number from 0 to"),
        ({"version": 1, "pods": [GOOD_POD], "name": "My Test"}, "name: must be 1-63 letters"),
        ({"version": 1, "pods": [GOOD_POD], "name": "x" * 64}, "name: must be 1-63 letters"),
        ({"version": 1, "pods": [{**GOOD_POD, "namespace": "my.ns"}]}, "pods[0].namespace: must be a namespace name"),
        (
            {"version": 1, "pods": [{**GOOD_POD, "labels": {"bad key!": "x"}}]},
            "pods[0].labels.bad key!: the key's name",
        ),
        ({"version": 1, "pods": [{**GOOD_POD, "labels": {"app": "a b"}}]}, "pods[0].labels.app: the value must be"),
        (
            {"version": 1, "pods": [GOOD_POD], "caches": [{"name": "c", "images": ["nginx"], "labels": {"-x": "1"}}]},
            "caches[0].labels.-x: the key's name",
        ),
        # A zone's offset taking the start out of the years 1 to 9999 in UTC.
        (
            {"version": 1, "pods": [GOOD_POD], "start": "0001-01-01T00:00:00+14:00"},
            "start: must be from year 1 to year 9999 once in UTC, got '0001-01-01T00:00:00+14:00'",
        ),
        (
            {"version": 1, "pods": [GOOD_POD], "start": datetime(9999, 12, 31, 23, 59, tzinfo=timezone(-HOURS_5))},
            "start: must be from year 1 to year 9999 once in UTC, got '9999-12-31T23:59:00-05:00'",
        ),
        # YAML's true is a Python int, 1.0 equals 1: neither is version 1.
        ({"version": True, "pods": [GOOD_POD]}, "version: must be 1, got True"),
        ({"version": 1.0, "pods": [GOOD_POD]}, "version: must be 1, got 1.0"),
        # The run's own labels: simulate sets them to the workload's name and seed.
        (
            {"version": 1, "pods": [{**GOOD_POD, "labels": {"vk-provider.io/simulation": "other"}}]},
            "pods[0].labels.vk-provider.io/simulation: is the run's own label, set by simulate to the workload's "
            "name and seed; use another key",
        ),
        (
            {"version": 1, "pods": [{**GOOD_POD, "labels": {"vk-provider.io/simulation-seed": "42"}}]},
            "pods[0].labels.vk-provider.io/simulation-seed: is the run's own label",
        ),
        (
            {
                "version": 1,
                "pods": [GOOD_POD],
                "caches": [{"name": "c", "images": ["nginx"], "labels": {"vk-provider.io/simulation": "w"}}],
            },
            "caches[0].labels.vk-provider.io/simulation: is the run's own label",
        ),
        # Retries whose doubled back-off is past any date, or that take no time and never end.
        (
            {"version": 1, "pods": [GOOD_POD], "pull": {"max_retries": 10000}},
            "pull.max_retries: must be a whole number up to 1000, got 10000",
        ),
    ],
)
def test_workload_errors_name_the_file_and_the_field(document: object, needle: str) -> None:
    with pytest.raises(WorkloadError) as caught:
        parse_workload(document, source="w.yaml")
    assert str(caught.value).startswith("w.yaml: ")
    assert needle in str(caught.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(WorkloadError) as caught:
        parse_workload({"version": 1, "pods": [{"name": "Bad", "images": []}], "seed": "x"}, source="w.yaml")
    message = str(caught.value)
    assert "pods[0].name" in message
    assert "pods[0].images" in message
    assert "seed" in message


def test_files_that_cannot_be_read_or_parsed(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="cannot read workload file"):
        load_workload(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pods: [\n")
    with pytest.raises(WorkloadError, match=r"bad.yaml line \d+: expected the node content"):
        load_workload(bad)


@pytest.mark.parametrize(
    ("stem", "name"),
    [("burst", "burst"), ("My Test Workload", "My-Test-Workload"), ("x" * 80, "x" * 63), ("--", "workload")],
)
def test_a_workload_without_a_name_is_named_after_its_file_as_a_label_value(stem: str, name: str) -> None:
    spec = parse_workload({"version": 1, "pods": [GOOD_POD]}, source=f"/some/dir/{stem}.yaml")
    assert spec.name == name


def test_annotation_values_written_unquoted_become_strings() -> None:
    spec = workload([{**GOOD_POD, "annotations": {"k8s.aliyun.com/eci-auto-imc": True, "n": 3}}])
    assert dict(spec.pods[0].annotations) == {"k8s.aliyun.com/eci-auto-imc": "true", "n": "3"}


@pytest.mark.parametrize(
    ("arrival", "expected"),
    [
        (Arrival(), [0.0, 0.0, 0.0]),
        (Arrival(start=5.0), [5.0, 5.0, 5.0]),
        (Arrival(start=10.0, interval=2.0), [10.0, 12.0, 14.0]),
        (Arrival(times=(3.0, 1.0, 2.0)), [3.0, 1.0, 2.0]),
    ],
)
def test_fixed_arrivals(arrival: Arrival, expected: list[float]) -> None:
    assert arrival.times_for(3, random.Random(0)) == expected


def test_poisson_arrivals_are_seeded_and_about_the_rate() -> None:
    arrival = Arrival(start=100.0, rate=0.5)
    first = arrival.times_for(2000, random.Random(3))
    assert first == arrival.times_for(2000, random.Random(3))
    assert first != arrival.times_for(2000, random.Random(4))
    assert first == sorted(first)
    assert first[0] > 100.0
    mean_gap = (first[-1] - 100.0) / 2000
    assert mean_gap == pytest.approx(2.0, rel=0.1)


# ---- the simulation ----------------------------------------------------------------------------


NGINX_CACHE = {"name": "nginx-cache", "id": "imc-nginxcache0000000000", "images": ["nginx:1.7.9"]}


def test_the_calibration_image_starts_in_about_fifty_seconds_without_a_cache_and_five_with_one() -> None:
    spec = workload(
        [
            {"name": "cold", "images": ["python:3.12"]},
            {"name": "warm", "images": ["python:3.12"], "annotations": AUTO, "arrival": {"at": 100}},
        ],
        caches=[{"name": "py", "images": ["python:3.12"]}],
        pull=NO_JITTER,
    )
    result = run(spec)
    seconds = {record.name: record.startup_seconds for record in result.records}
    assert outcomes(result) == {"cold": CacheOutcome.NONE, "warm": CacheOutcome.AUTO_HIT}
    assert seconds["cold"] == pytest.approx(50.0, rel=0.2)
    assert seconds["warm"] == pytest.approx(5.0, rel=0.2)
    cold = next(record for record in result.records if record.name == "cold")
    assert cold.bytes_pulled == pytest.approx(386_000_000, rel=0.05)
    assert cold.container_start_seconds == 1.5
    warm = next(record for record in result.records if record.name == "warm")
    assert warm.bytes_pulled == 0
    assert warm.images[0].from_cache
    assert warm.snapshot_attach_seconds > 0


def test_explicit_hit_none_and_the_failures() -> None:
    spec = workload(
        [
            {"name": "named", "images": ["nginx:1.7.9"], "annotations": EXPLICIT},
            {"name": "plain", "images": ["nginx:1.7.9"]},
            {
                "name": "ghost",
                "images": ["nginx:1.7.9"],
                "annotations": {"k8s.aliyun.com/eci-imc-id": "imc-nosuchcache000000000"},
            },
            {
                "name": "early",
                "images": ["redis:7.2"],
                "annotations": {"k8s.aliyun.com/eci-imc-id": "imc-rediscache0000000000"},
            },
        ],
        caches=[
            NGINX_CACHE,
            {"name": "redis-cache", "id": "imc-rediscache0000000000", "images": ["redis:7.2"], "build": True},
        ],
    )
    result = run(spec)
    assert outcomes(result) == {
        "named": CacheOutcome.EXPLICIT_HIT,
        "plain": CacheOutcome.NONE,
        "ghost": CacheOutcome.FAILED,  # recorded, as the agent records them: the report counts them
        "early": CacheOutcome.FAILED,
    }
    assert {failure.name: failure.reason for failure in result.failures} == {
        "ghost": "ImageCacheNotFound",
        "early": "ImageCacheNotComplete",
    }
    assert all(failure.recorded for failure in result.failures)
    ghost = next(record for record in result.records if record.name == "ghost")
    assert ghost.imc_id == "imc-nosuchcache000000000"
    assert ghost.images == ()
    assert ghost.startup_seconds == 0.0
    assert "does not exist" in ghost.reason
    assert "1 ImageCacheNotFound (recorded as failed)" in "\n".join(summary_lines(result))
    named = next(record for record in result.records if record.name == "named")
    assert named.imc_id == "imc-nginxcache0000000000"
    assert result.hits[0][0] == "imc-nginxcache0000000000"
    # The cache built from second 0 is Ready by the end.
    assert {cache.name: cache.phase for cache in result.caches}["redis-cache"] is CachePhase.READY


def test_a_miss_creates_one_shared_automatic_cache_and_later_pods_hit_it() -> None:
    spec = workload(
        [{"name": "api", "count": 12, "images": ["node:20"], "annotations": AUTO, "arrival": {"interval": 10}}],
        snapshot_seconds=20,
    )
    result = run(spec)
    automatic = [cache for cache in result.caches if cache.automatic]
    assert len(automatic) == 1
    cache = automatic[0]
    assert cache.phase is CachePhase.READY
    assert cache.name.startswith("auto-create-for-")
    by_order = [record.outcome for record in sorted(result.records, key=lambda r: r.created_at)]
    first_hit = by_order.index(CacheOutcome.AUTO_HIT)
    assert first_hit > 0
    assert set(by_order[:first_hit]) == {CacheOutcome.MISS}
    assert set(by_order[first_hit:]) == {CacheOutcome.AUTO_HIT}
    hits = [record for record in result.records if record.outcome is CacheOutcome.AUTO_HIT]
    assert {record.imc_id for record in hits} == {cache.imc_id}
    assert len(result.hits) == len(hits)
    assert cache.last_matched_at == max(record.created_at for record in hits)


def test_partial_hit_pulls_only_what_the_cache_lacks() -> None:
    spec = workload(
        [{"name": "both", "images": ["nginx:1.7.9", "redis:7.2"], "annotations": EXPLICIT}],
        caches=[NGINX_CACHE],
    )
    (record,) = run(spec).records
    assert record.outcome is CacheOutcome.PARTIAL
    assert [(image.from_cache, image.bytes_pulled > 0) for image in record.images] == [(True, False), (False, True)]


def test_concurrent_pulls_share_the_registry() -> None:
    alone = run(workload([{"name": "one", "images": ["python:3.12"]}], pull=NO_JITTER)).records[0].startup_seconds
    crowd = run(workload([{"name": "many", "count": 60, "images": ["python:3.12"]}], pull=NO_JITTER))
    slowest = max(record.startup_seconds for record in crowd.records)
    # 60 Pods at 8.5 MB/s want 510 MB/s from a 125 MB/s registry: about 4x slower.
    assert slowest > 3 * alone


def test_same_seed_same_numbers_and_another_seed_differs() -> None:
    spec = workload(
        [
            {"name": "web", "count": 40, "images": ["nginx:1.27"], "annotations": AUTO, "arrival": {"rate": 0.2}},
            {"name": "base", "count": 40, "images": ["redis:7.2"], "arrival": {"rate": 0.2}},
        ]
    )
    first, second, other = run(spec, seed=5), run(spec, seed=5), run(spec, seed=6)
    assert first.records == second.records
    assert first.caches == second.caches
    assert [r.startup_seconds for r in first.records] != [r.startup_seconds for r in other.records]
    assert first.records[0].pod_uid != other.records[0].pod_uid


def test_pod_records_carry_names_labels_and_times() -> None:
    spec = workload(
        [{"name": "web", "namespace": "shop", "count": 2, "images": ["busybox:1.36"], "labels": {"app": "web"}}],
        start="2026-03-01T08:00:00Z",
        node="vk-7",
    )
    result = run(spec)
    assert sorted(record.name for record in result.records) == ["web-0", "web-1"]
    record = result.records[0]
    run_labels = (("vk-provider.io/simulation", "t"), ("vk-provider.io/simulation-seed", "0"))
    assert (record.namespace, record.node, record.labels) == ("shop", "vk-7", (("app", "web"), *run_labels))
    assert record.created_at == datetime(2026, 3, 1, 8, tzinfo=UTC)
    assert (record.started_at - record.created_at).total_seconds() == pytest.approx(record.startup_seconds)
    assert record.startup_seconds == pytest.approx(
        record.snapshot_attach_seconds + record.pull_seconds + record.container_start_seconds
    )


def test_never_policy_without_the_image_fails_the_pod() -> None:
    result = run(workload([{"name": "never", "images": ["busybox:1.36"], "pull_policy": "Never"}]))
    assert result.records == ()  # not a cache failure: never started, and not recorded
    assert [(failure.reason, failure.recorded) for failure in result.failures] == [("ErrImageNeverPull", False)]
    assert "1 ErrImageNeverPull (never started, not recorded)" in "\n".join(summary_lines(result))


def test_a_day_of_arrivals_runs_on_virtual_time() -> None:
    spec = workload([{"name": "cron", "count": 288, "images": ["busybox:1.36"], "arrival": {"interval": "5m"}}])
    started = time.perf_counter()
    result = run(spec)
    assert result.simulated_seconds > 23.9 * 3600
    # Virtual time: a simulated day passes at least a thousand times faster than the wall clock
    # (a property of the clock, not a speed figure: bench/simulate_1000.py measures speed).
    assert result.simulated_seconds > 1000 * (time.perf_counter() - started)


def test_the_thousand_pod_burst_is_repeatable() -> None:
    # Its speed is a benchmark's business (bench/simulate_1000.py), not a test's.
    spec = load_workload(ROOT / "config" / "workload-burst.yaml")
    first = run(spec)
    second = run(spec)
    assert len(first.records) + sum(1 for failure in first.failures if not failure.recorded) == 1000
    assert first.records == second.records
    comparison = build_comparison(first.records)
    assert comparison.speedup is not None
    assert comparison.speedup.p50_ratio > 5


def test_store_writes_the_run_and_a_second_store_of_it_changes_nothing(tmp_path: Path) -> None:
    spec = workload(
        [
            {"name": "web", "count": 5, "images": ["nginx:1.7.9"], "annotations": AUTO, "labels": {"app": "web"}},
            {"name": "base", "count": 3, "images": ["redis:7.2"]},
        ],
        caches=[NGINX_CACHE],
    )
    result = run(spec)  # on its own virtual loop; the database work below runs on a normal one
    asyncio.run(_store_twice(result, str(tmp_path / "sim.db")))


async def _store_twice(result: SimulationResult, db: str) -> None:
    from vk_provider.registry import open_registry

    summary = await store(result, db)
    assert (summary.recorded, summary.replaced) == (8, 0)
    registry = await open_registry(db)
    try:
        stored = await registry.list_pod_starts()
        cache = await registry.get_cache_by_name("nginx-cache")
        manifest = await registry.get_manifest("docker.io/library/nginx:1.7.9")
    finally:
        await registry.close()
    assert sorted(stored, key=lambda r: r.pod_uid) == sorted(result.records, key=lambda r: r.pod_uid)
    assert cache is not None
    assert cache.last_matched_at == max(moment for _, moment, _ in result.hits)
    assert manifest is not None
    again = await store(result, db)
    assert (again.recorded, again.replaced) == (8, 8)  # the same run again: replaced by itself
    registry = await open_registry(db)
    try:
        assert sorted(await registry.list_pod_starts(), key=lambda r: r.pod_uid) == sorted(
            stored, key=lambda r: r.pod_uid
        )
    finally:
        await registry.close()
    with sqlite3.connect(db) as conn:
        (hits,) = conn.execute("SELECT hit_count FROM caches WHERE name = 'nginx-cache'").fetchone()
    assert hits == len(result.hits) == 5  # counted once, not once per store


def test_simulate_refuses_to_run_inside_an_event_loop() -> None:
    async def inside() -> None:
        run(workload([GOOD_POD]))

    with pytest.raises(RuntimeError, match="cannot be called from a running event loop"):
        asyncio.run(inside())


def test_workload_catalogs_are_read_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "images": {
                    "registry.example.com/team/app:1": {
                        "layers": [{"digest": "sha256:" + "a" * 64, "size": "10 MB", "uncompressed_size": "20 MB"}]
                    }
                },
            }
        )
    )
    file = tmp_path / "w.yaml"
    file.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "catalogs": ["mine.yaml"],
                "pods": [{"name": "a", "images": ["registry.example.com/team/app:1"]}],
            }
        )
    )
    spec = load_workload(file)
    result = simulate(spec)
    assert result.records[0].bytes_pulled == 10_000_000
    missing = parse_workload({"version": 1, "catalogs": ["nope.yaml"], "pods": [GOOD_POD]}, "w.yaml", tmp_path)
    with pytest.raises(WorkloadError, match=r"w\.yaml: catalogs: cannot read image catalog"):
        load_workload_catalog(missing)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("root:x:0:0:root:/root:/bin/bash\n", "the catalog must be a mapping with an 'images' key"),
        (
            "version: 1\nimages:\n  registry.example.com/app:1:\n    layers: [{digest: sha256:abc, size: 1 MB}]\n",
            "image 'registry.example.com/app:1'",
        ),
    ],
)
def test_a_workload_catalog_with_a_bad_entry_is_an_error_not_made_up_sizes(
    text: str, needle: str, tmp_path: Path
) -> None:
    # The agent leaves a bad entry out with a warning; a simulation would quietly use a synthetic size.
    (tmp_path / "mine.yaml").write_text(text)
    spec = parse_workload({"version": 1, "catalogs": ["mine.yaml"], "pods": [GOOD_POD]}, "w.yaml", tmp_path)
    with pytest.raises(WorkloadError, match=r"w\.yaml: catalogs: .*mine\.yaml") as caught:
        load_workload_catalog(spec)
    assert needle in str(caught.value)


def _huge_catalog(tmp_path: Path) -> None:
    (tmp_path / "huge.yaml").write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "images": {
                    "registry.example.com/huge:1": {
                        "layers": [{"digest": "sha256:" + "b" * 64, "size": "9 GB", "uncompressed_size": "25 GB"}]
                    }
                },
            }
        )
    )


def _huge_cache_workload(tmp_path: Path, *, build: bool) -> WorkloadSpec:
    _huge_catalog(tmp_path)
    return parse_workload(
        {
            "version": 1,
            "catalogs": ["huge.yaml"],
            "caches": [
                {"name": "small", "images": ["nginx:1.27"]},
                {
                    "name": "huge",
                    "id": "imc-hugecache00000000000",
                    "images": ["registry.example.com/huge:1"],
                    "build": build,
                    "at": 30,
                },
            ],
            "pods": [
                {
                    "name": "p",
                    "images": ["registry.example.com/huge:1"],
                    "annotations": {"k8s.aliyun.com/eci-imc-id": "imc-hugecache00000000000"},
                    "arrival": {"at": 60},
                }
            ],
        },
        "w.yaml",
        tmp_path,
    )


def test_a_cache_too_small_for_its_extracted_images_fails_its_build(tmp_path: Path) -> None:
    result = simulate(_huge_cache_workload(tmp_path, build=True))
    cache = next(cache for cache in result.caches if cache.name == "huge")
    assert cache.phase is CachePhase.FAILED
    assert "more than the cache's imageCacheSize of 20 GiB" in cache.message
    assert [failure.reason for failure in result.failures] == ["ImageCacheNotComplete"]


def test_a_cache_not_built_must_hold_its_images_or_the_workload_is_refused(tmp_path: Path) -> None:
    # Before, it was Ready holding 25 GB (23.3 GiB) in 20 GiB (and the error, once checked at its "at", only logged).
    with pytest.raises(
        WorkloadError,
        match=r"w\.yaml: caches\[1\] \(huge\): its images need 23\.3 GiB extracted, more than its size_gib of 20",
    ):
        simulate(_huge_cache_workload(tmp_path, build=False))


def test_an_empty_list_is_called_empty() -> None:
    with pytest.raises(
        WorkloadError, match=r"pods\[0\]\.images: must be a non-empty list of image references, got an empty list"
    ):
        workload([{**GOOD_POD, "images": []}])


def test_pod_names_may_not_meet_across_groups() -> None:
    pods: list[dict[str, Any]] = [
        {"name": "a-0", "images": ["nginx:1.7.9"]},
        {"name": "a", "count": 2, "images": ["nginx:1.7.9"]},
    ]
    with pytest.raises(
        WorkloadError, match=r"w\.yaml: pods\[1\]: its Pod default/a-0 has the name of a Pod of pods\[0\]"
    ):
        workload(pods)
    workload([pods[0], {**pods[1], "namespace": "other"}])  # another namespace: another Pod


@pytest.mark.parametrize(
    "top",
    [
        # The year 9999 and then some: one clear error, not a traceback.
        {"start": "9999-12-31T23:59:59Z"},
        {"pull": {"container_start_seconds": 1.0e300}},
    ],
)
def test_simulated_time_past_the_year_9999_is_a_workload_error(top: dict[str, Any]) -> None:
    spec = workload([{**GOOD_POD, "arrival": {"at": 10}}], **top)
    with pytest.raises(WorkloadError, match="simulated time runs past the year 9999"):
        run(spec)


def finishes(work: Callable[[], object]) -> object:
    """What ``work()`` returns or raises, run on a thread: a deadline, not a wait (it takes
    milliseconds, or spins for ever)."""
    outcome: list[object] = []

    def target() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    runner = threading.Thread(target=target, daemon=True)
    runner.start()
    runner.join(20)
    assert outcome, "still running: it spins for ever"
    return outcome[0]


@pytest.mark.parametrize(
    ("pod", "top"),
    [
        ({"arrival": {"rate": 1.0e-310}}, {}),  # positive, but the mean gap 1/rate is infinite
        ({}, {"pull": {"pod_bandwidth": 1.0e-310}}),  # a layer's bytes / bandwidth: infinite
        ({}, {"pull": {"failure_probability": 1, "max_retries": 3, "retry_backoff_seconds": 1.0e308}}),
    ],
)
def test_simulated_time_reaching_infinity_is_the_year_9999_error_not_a_hang(
    pod: dict[str, Any], top: dict[str, Any]
) -> None:
    spec = workload([{**GOOD_POD, **pod}], **top)
    outcome = finishes(lambda: run(spec))
    assert isinstance(outcome, WorkloadError), outcome
    assert "simulated time runs past the year 9999" in str(outcome)


@pytest.mark.parametrize("when", [math.inf, math.nan])
def test_the_virtual_clock_never_jumps_to_infinity(when: float) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.call_at(when, done.set_result, None)  # a time never reached (NaN: not even ordered)
        await done

    outcome = finishes(lambda: run_virtual(main))
    assert isinstance(outcome, VirtualTimeOverflow), outcome


def test_a_virtual_run_stops_at_its_limit() -> None:
    async def main() -> None:
        await asyncio.sleep(100)
        await asyncio.sleep(1)

    with pytest.raises(VirtualTimeOverflow, match="virtual time would jump to 101 s, past its limit of 100 s"):
        run_virtual(main, limit=100)
    assert run_virtual(lambda: asyncio.sleep(100), limit=100) is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("start: 0001-01-01T00:00:00+14:00\n", "start: must be from year 1 to year 9999 once in UTC"),  # YAML's own
        ('start: "9999-12-31T23:59:00-05:00"\n', "start: must be from year 1 to year 9999 once in UTC"),
        ("[a, b]: 1\n", "line 2: a mapping key must be a string, number or boolean, not a list"),
        ("x:\n  ? {x: 1}\n  : y\n", "line 3: a mapping key must be a string, number or boolean, not a mapping"),
    ],
)
def test_a_bad_workload_file_is_a_one_line_error_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str
) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("version: 1\n" + text + "pods: [{name: web, images: [nginx]}]\n")
    assert cli.main(["simulate", str(path), "--db", str(tmp_path / "sim.db"), "--no-chart"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("vk-provider: error: "), err
    assert err.count("\n") == 1, err
    assert needle in err


def aliased(levels: int) -> list[Any]:
    """What nested YAML aliases make: each level nine times the one below, shared, not copied."""
    value: list[Any] = ["lol"] * 9
    for _ in range(levels):
        value = [value] * 9
    return value


HUGE = aliased(6)  # 9**7 strings: a repr of tens of megabytes (the tester's nine levels: gigabytes)
_CACHE = {"name": "c", "images": ["nginx"]}


@pytest.mark.parametrize(
    "document",
    [
        {"version": HUGE},
        {"name": HUGE},
        {"seed": HUGE},
        {"start": HUGE},
        {"node": HUGE},
        {"default_auto": HUGE},
        {"snapshot_seconds": HUGE},
        {"pull": {"jitter": HUGE}},
        {"pull": {"max_retries": HUGE}},
        {"pods": [{**GOOD_POD, "name": HUGE}]},
        {"pods": [{**GOOD_POD, "count": HUGE}]},
        {"pods": [{**GOOD_POD, "namespace": HUGE}]},
        {"pods": [{**GOOD_POD, "pull_policy": HUGE}]},
        {"pods": [{**GOOD_POD, "arrival": {"at": HUGE}}]},
        {"pods": [{**GOOD_POD, "arrival": {"times": [HUGE]}}]},
        {"pods": [{**GOOD_POD, "arrival": {"interval": HUGE}}]},
        {"pods": [{**GOOD_POD, "arrival": {"rate": HUGE}}]},
        {"caches": [{**_CACHE, "id": HUGE}]},
        {"caches": [{**_CACHE, "build": HUGE}]},
        {"caches": [{**_CACHE, "size_gib": HUGE}]},
        {"caches": [{**_CACHE, "retention_days": HUGE}]},
        {"caches": [{**_CACHE, "at": HUGE}]},
        {"pods": [{**GOOD_POD, "namespace": "x" * 100_000}]},
        {"pods": [{**GOOD_POD, "images": ["NGINX" * 100_000]}]},
    ],
    ids=reprlib.repr,
)
def test_an_error_quotes_a_huge_bad_value_cut_short(document: dict[str, Any]) -> None:
    with pytest.raises(WorkloadError) as caught:
        parse_workload({"version": 1, "pods": [GOOD_POD], **document}, source="w.yaml")
    message = str(caught.value)
    assert len(message) < 400, message[:400]
    assert "got" in message or "invalid image reference" in message


def test_bandwidths_written_as_floats_are_numbers_not_whole_numbers() -> None:
    pull = {"stream_bandwidth": 2.5e7, "registry_bandwidth": 1.25e8, "decompression_throughput": 3.6e8}
    spec = workload([GOOD_POD], pull=pull)
    assert (spec.pull.stream_bandwidth, spec.pull.registry_bandwidth, spec.pull.decompression_throughput) == (
        2.5e7,
        1.25e8,
        3.6e8,
    )
    with pytest.raises(WorkloadError, match=r"pull\.max_retries: must be a whole number up to 1000, got 2\.0"):
        workload([GOOD_POD], pull={"max_retries": 2.0})  # a count stays a whole number


def test_numbers_yaml_reads_as_strings_are_numbers(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads 1e-3 and 1e7, with no dot, as strings; JSON and YAML 1.2 as numbers.
    path = tmp_path / "w.yaml"
    path.write_text(
        "version: 1\nsnapshot_seconds: 3e1\npull: {pod_bandwidth: 1e7, retry_backoff_seconds: 5E-1}\n"
        "pods: [{name: web, images: [nginx], count: 2, arrival: {rate: 1e-3, start: 1e2}}]\n"
    )
    spec = load_workload(path)
    assert (spec.snapshot_seconds, spec.pull.pod_bandwidth, spec.pull.retry_backoff_seconds) == (30.0, 1e7, 0.5)
    assert (spec.pods[0].arrival.rate, spec.pods[0].arrival.start) == (1e-3, 100.0)
    assert (parse_rate("1e-300"), parse_duration("1e3"), parse_duration("+2.5e1")) == (1e-300, 1000.0, 25.0)
    for bad in ("1e400", "-1e3", "nan", "inf", "1_000", "0e0", "1e"):
        assert parse_rate(bad) is None, bad
    for bad in ("1e400", "-1e3", "nan", "inf", "1_000", "1e"):
        assert parse_duration(bad) is None, bad


def test_a_whole_number_too_big_for_a_float_is_an_error_not_a_traceback() -> None:
    assert (parse_rate(10**400), parse_duration(10**400)) == (None, None)
    with pytest.raises(WorkloadError, match="pull: pod_bandwidth must be a positive number, got inf"):
        workload([GOOD_POD], pull={"pod_bandwidth": 10**400})


def test_a_workload_running_for_years_of_simulated_time_finishes() -> None:
    spec = workload([{**GOOD_POD, "count": 200, "arrival": {"interval": "1d"}}])  # past 2**24 s
    result = run(spec)
    assert len(result.records) == 200
    assert result.simulated_seconds > 199 * 86400


def test_a_group_added_to_a_workload_counts_its_own_hits(tmp_path: Path) -> None:
    web = {"name": "web", "count": 3, "images": ["nginx:1.7.9"], "annotations": EXPLICIT}
    first = workload([web], caches=[NGINX_CACHE])
    more = workload([web, {**web, "name": "api", "count": 2}], caches=[NGINX_CACHE])
    db = tmp_path / "sim.db"
    assert asyncio.run(store(run(first), str(db))).recorded == 3
    again = asyncio.run(store(run(more), str(db)))
    assert (again.recorded, again.replaced) == (5, 3)  # web's 3 replaced, and api's 2
    with sqlite3.connect(db) as conn:
        (hits,) = conn.execute("SELECT hit_count FROM caches WHERE name = 'nginx-cache'").fetchone()
    assert hits == 5  # web's 3 once, and api's 2


def test_an_edited_workload_run_again_replaces_its_earlier_run_and_leaves_others(tmp_path: Path) -> None:
    web = {"name": "web", "count": 4, "images": ["nginx:1.7.9"], "annotations": EXPLICIT}
    db = str(tmp_path / "sim.db")
    asyncio.run(store(run(workload([web], caches=[NGINX_CACHE], name="other")), db))  # another workload
    asyncio.run(store(run(workload([web], caches=[NGINX_CACHE])), db))
    # Edited: fewer Pods, and they no longer ask for the cache. Before, the old starts stayed (4
    # hits, the old times) and only the caches took the new run.
    edited = run(workload([{**web, "count": 2, "annotations": {}}], caches=[NGINX_CACHE]))
    again = asyncio.run(store(edited, db))
    assert (again.recorded, again.replaced) == (2, 4)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT name, cache_outcome, labels FROM pod_starts ORDER BY id").fetchall()
        (hits,) = conn.execute("SELECT hit_count FROM caches WHERE name = 'nginx-cache'").fetchone()
    runs = [json.loads(labels)["vk-provider.io/simulation"] for _, _, labels in rows]
    assert runs == ["other"] * 4 + ["t"] * 2
    assert [outcome for _, outcome, _ in rows[4:]] == ["none", "none"]
    assert hits == 4  # the other workload's 4; this one's earlier 4 came off


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({"k8s.aliyun.com/imc-match-count-request": "abc"}, 'imc-match-count-request="abc" is not a whole number'),
        ({"k8s.aliyun.com/imc-perfect-match": "yes"}, 'imc-perfect-match="yes" is not "true" or "false"'),
        ({"k8s.aliyun.com/eci-auto-imc": "maybe"}, 'eci-auto-imc="maybe" is not "true" or "false"'),
    ],
)
def test_malformed_cache_annotations_are_workload_errors(annotations: dict[str, str], message: str) -> None:
    with pytest.raises(WorkloadError, match=r"pods\[0\]\.annotations: annotation k8s\.aliyun\.com/") as caught:
        workload([{**GOOD_POD, "annotations": annotations}])
    assert message in str(caught.value)
    assert "ignored" not in str(caught.value)


def test_a_cache_other_pods_used_cannot_be_changed_by_another_run_and_nothing_is_written(tmp_path: Path) -> None:
    db = str(tmp_path / "sim.db")
    pods = [{"name": "web", "count": 2, "images": ["nginx:1.7.9"], "annotations": AUTO}]
    asyncio.run(store(run(workload(pods, caches=[NGINX_CACHE], name="first")), db))
    # Another workload calling other images by that name would rewrite it under the first's hits.
    redis = {**NGINX_CACHE, "images": ["redis:7.2"]}
    with pytest.raises(CacheNameTakenError, match=r"Pod starts used it \(2 of workload 'first' \(seed 0\)\)"):
        asyncio.run(store(run(workload(pods, caches=[redis], name="third")), db))
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM pod_starts").fetchone()[0] == 2
        (images,) = conn.execute(
            "SELECT group_concat(reference) FROM cache_images JOIN caches ON caches.id = cache_id "
            "WHERE name = 'nginx-cache'"
        ).fetchone()
    assert images == "docker.io/library/nginx:1.7.9"
    # The same images and size: shared. Then neither may change it under the other's Pods...
    asyncio.run(store(run(workload(pods, caches=[NGINX_CACHE], name="second")), db))
    with pytest.raises(CacheNameTakenError, match=r"2 of workload 'second' \(seed 0\)"):
        asyncio.run(store(run(workload(pods, caches=[redis], name="first")), db))
    # ...but a cache no other run's Pods used may change, as a workload is edited and run again.
    quiet = [{"name": "web", "count": 2, "images": ["nginx:1.7.9"]}]
    solo = {"name": "solo", "images": ["nginx:1.7.9"]}
    asyncio.run(store(run(workload(quiet, caches=[solo], name="solo")), db))
    asyncio.run(store(run(workload(quiet, caches=[{**solo, "images": ["redis:7.2"]}], name="solo")), db))


def test_a_store_that_fails_half_way_leaves_the_earlier_run_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vk_provider.registry.repository import Registry

    db = str(tmp_path / "sim.db")
    web = {"name": "web", "count": 4, "images": ["nginx:1.7.9"], "annotations": EXPLICIT}
    asyncio.run(store(run(workload([web], caches=[NGINX_CACHE])), db))
    snapshot = _rows(db)

    async def interrupted(self: Registry, *args: Any, **kwargs: Any) -> bool:
        raise KeyboardInterrupt  # as Ctrl-C would, after the old run's starts were deleted

    monkeypatch.setattr(Registry, "mark_cache_matched", interrupted)
    with pytest.raises(KeyboardInterrupt):
        asyncio.run(store(run(workload([{**web, "count": 2}], caches=[NGINX_CACHE])), db))
    assert _rows(db) == snapshot  # before, the old run's starts were gone and its hits taken off


def _rows(db: str) -> tuple[list[Any], ...]:
    with sqlite3.connect(db) as conn:
        return (
            conn.execute("SELECT pod_uid, startup_seconds FROM pod_starts ORDER BY pod_uid").fetchall(),
            conn.execute("SELECT name, hit_count, phase FROM caches ORDER BY name").fetchall(),
            conn.execute("SELECT count(*) FROM pod_start_images").fetchall(),
        )


def test_a_run_again_drops_the_automatic_caches_its_earlier_run_made_and_nothing_used(tmp_path: Path) -> None:
    db = str(tmp_path / "sim.db")
    auto = {"name": "py", "count": 2, "images": ["python:3.12"], "annotations": AUTO, "arrival": {"interval": "1s"}}
    web = {"name": "web", "count": 2, "images": ["nginx:1.7.9"]}
    asyncio.run(store(run(workload([auto, web])), db))
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM caches WHERE automatic").fetchone() == (1,)
    asyncio.run(store(run(workload([web])), db))  # the python group removed
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM caches WHERE automatic").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pod_starts").fetchone() == (2,)


def _hit_counts_storing_it_thrice(result: SimulationResult, db: str) -> list[int]:
    """nginx-cache's hit count after each of three stores of ``result``."""
    counts = []
    for _ in range(3):
        asyncio.run(store(result, db))
        with sqlite3.connect(db) as conn:
            counts.append(conn.execute("SELECT hit_count FROM caches WHERE name = 'nginx-cache'").fetchone()[0])
    return counts


def test_storing_a_run_again_counts_its_hits_once_even_of_pods_that_never_started(tmp_path: Path) -> None:
    # The cache holds nginx; busybox, with pull policy Never, is absent: the Pods hit and never start.
    never = {"name": "p", "count": 3, "images": ["nginx:1.7.9", "busybox:1.36"], "pull_policy": "Never"}
    result = run(workload([{**never, "annotations": EXPLICIT}], caches=[NGINX_CACHE]))
    assert (len(result.records), len(result.hits)) == (0, 3)
    assert _hit_counts_storing_it_thrice(result, str(tmp_path / "sim.db")) == [
        0,
        0,
        0,
    ]  # before: 3, 6, 9 (only Pods with a record are counted, and taken back)


def test_storing_a_run_again_takes_back_the_hits_of_partial_matches(tmp_path: Path) -> None:
    # The cache holds nginx, the Pods want nginx and redis: each start is partial, a hit on the cache.
    pods = [{"name": "p", "count": 3, "images": ["nginx:1.7.9", "redis:7.2"], "annotations": EXPLICIT}]
    result = run(workload(pods, caches=[NGINX_CACHE]))
    assert [record.outcome for record in result.records] == [CacheOutcome.PARTIAL] * 3
    assert _hit_counts_storing_it_thrice(result, str(tmp_path / "sim.db")) == [
        3,
        3,
        3,
    ]  # before: 3, 6, 9 (a partial start's hit was not taken back)


def test_a_workload_may_rename_its_own_cache_keeping_its_id(tmp_path: Path) -> None:
    db = str(tmp_path / "sim.db")
    pods = [{"name": "web", "count": 2, "images": ["nginx:1.7.9"], "annotations": EXPLICIT}]
    asyncio.run(store(run(workload(pods, caches=[NGINX_CACHE])), db))
    asyncio.run(store(run(workload(pods, caches=[{**NGINX_CACHE, "name": "web-cache"}])), db))
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name, hit_count FROM caches").fetchall() == [("web-cache", 2)]
    # ...but not one that another run's Pods used.
    asyncio.run(store(run(workload(pods, caches=[{**NGINX_CACHE, "name": "web-cache"}], name="other")), db))
    with pytest.raises(CacheNameTakenError, match="which cache 'web-cache' has in the database"):
        asyncio.run(store(run(workload(pods, caches=[{**NGINX_CACHE, "name": "third-name"}])), db))
