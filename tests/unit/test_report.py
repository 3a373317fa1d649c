"""The comparison report: nearest-rank percentiles, grouping, filters and every rendering."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vk_provider.domain.records import CacheOutcome, ImagePullRecord, PodStartRecord
from vk_provider.report import (
    AXIS_LABEL,
    CSV_COLUMNS,
    LabelSelector,
    ReportError,
    ReportFilter,
    build_comparison,
    default_chart_path,
    parse_selector,
    parse_time,
    percentile,
    render_csv,
    render_html,
    render_json,
    render_text,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def record(
    n: int,
    outcome: CacheOutcome,
    seconds: float,
    *,
    pulled: int = 0,
    namespace: str = "default",
    labels: dict[str, str] | None = None,
    started_after: float | None = None,
) -> PodStartRecord:
    started = T0 + timedelta(seconds=started_after if started_after is not None else n)
    return PodStartRecord(
        pod_uid=f"uid-{n}",
        namespace=namespace,
        name=f"pod-{n}",
        node="vk",
        outcome=outcome,
        imc_id=None,
        reason="test",
        images=(ImagePullRecord("docker.io/library/nginx:1.27", pulled, seconds / 2),),
        resolve_seconds=0.0,
        snapshot_attach_seconds=0.0,
        container_start_seconds=1.5,
        startup_seconds=seconds,
        created_at=started - timedelta(seconds=seconds),
        started_at=started,
        labels=tuple(sorted((labels or {}).items())),
    )


# ---- percentiles -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [
        ([7.0], 50, 7.0),
        ([7.0], 99, 7.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 75, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 76, 4.0),
        ([1.0, 2.0, 3.0, 4.0, 5.0], 50, 3.0),
        ([float(v) for v in range(1, 11)], 90, 9.0),
        ([float(v) for v in range(1, 11)], 91, 10.0),
        ([float(v) for v in range(1, 101)], 99, 99.0),
        ([float(v) for v in range(1, 101)], 100, 100.0),
        ([float(v) for v in range(1, 1001)], 99, 990.0),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], p: float, expected: float) -> None:
    assert percentile(values, p) == expected


@pytest.mark.parametrize(("values", "p"), [([], 50), ([1.0], 0), ([1.0], 101), ([1.0], -5)])
def test_percentile_refuses_nonsense(values: list[float], p: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        percentile(values, p)


@given(
    st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=200),
    st.integers(min_value=1, max_value=100),
)
def test_percentile_properties(values: list[float], p: int) -> None:
    ordered = sorted(values)
    result = percentile(ordered, p)
    assert result in ordered
    n = len(ordered)
    # At least p % of the values are at or below it, and fewer than p % strictly below.
    assert sum(1 for v in ordered if v <= result) * 100 >= p * n
    assert sum(1 for v in ordered if v < result) * 100 < p * n
    if p < 100:
        assert percentile(ordered, p + 1) >= result


# ---- the comparison ----------------------------------------------------------------------------


def sample() -> list[PodStartRecord]:
    hits = [record(i, CacheOutcome.AUTO_HIT, 4.0 + i / 10) for i in range(10)]
    explicit = [record(100 + i, CacheOutcome.EXPLICIT_HIT, 5.0) for i in range(2)]
    misses = [record(200 + i, CacheOutcome.MISS, 50.0 + i, pulled=386_000_000) for i in range(5)]
    none = [record(300 + i, CacheOutcome.NONE, 40.0, pulled=39_000_000, namespace="other") for i in range(3)]
    return [*misses, *hits, *none, *explicit]


def test_rows_follow_the_outcome_order_with_counts_means_and_bytes() -> None:
    comparison = build_comparison(sample())
    assert [row.outcome for row in comparison.rows] == [
        CacheOutcome.EXPLICIT_HIT,
        CacheOutcome.AUTO_HIT,
        CacheOutcome.MISS,
        CacheOutcome.NONE,
    ]
    miss = comparison.rows[2]
    assert (miss.pods, miss.p50, miss.p90, miss.p99, miss.min, miss.max) == (5, 52.0, 54.0, 54.0, 50.0, 54.0)
    assert miss.mean == pytest.approx(52.0)
    assert miss.bytes_pulled == 5 * 386_000_000
    assert miss.mean_bytes_pulled == 386_000_000
    assert miss.mean_pull_seconds == pytest.approx(26.0)
    assert comparison.pods == 20


def test_speedup_compares_hits_with_starts_without_a_cache() -> None:
    speedup = build_comparison(sample()).speedup
    assert speedup is not None
    assert (speedup.hit_pods, speedup.no_cache_pods) == (12, 8)
    hits = sorted([4.0 + i / 10 for i in range(10)] + [5.0, 5.0])
    without = sorted([50.0, 51.0, 52.0, 53.0, 54.0, 40.0, 40.0, 40.0])
    assert speedup.hit_p50 == hits[5]
    assert speedup.no_cache_p50 == without[3]
    assert speedup.p50_ratio == pytest.approx(without[3] / hits[5])
    assert speedup.mean_ratio == pytest.approx((sum(without) / 8) / (sum(hits) / 12))


def _of(image: str, r: PodStartRecord) -> PodStartRecord:
    return replace(r, images=(ImagePullRecord(image, r.bytes_pulled, r.startup_seconds / 2),))


def test_the_speedup_over_pods_of_the_same_images_only() -> None:
    # Small nginx Pods hit, big python Pods were pulled, and a few nginx Pods missed: the overall
    # figure mixes images; the same-images one compares nginx with nginx.
    nginx, python = "docker.io/library/nginx:1.27", "docker.io/library/python:3.12"
    records = [_of(nginx, record(i, CacheOutcome.AUTO_HIT, 4.0)) for i in range(6)]
    records += [_of(python, record(10 + i, CacheOutcome.NONE, 50.0)) for i in range(4)]
    records += [_of(nginx, record(20 + i, CacheOutcome.MISS, 8.0)) for i in range(2)]
    comparison = build_comparison(records)
    assert comparison.images_differ
    same = comparison.same_images
    assert same is not None
    assert (same.hit_pods, same.no_cache_pods, same.p50_ratio) == (6, 2, 2.0)
    text = render_text(comparison)
    assert "the same, over Pods of the same images only (6 hits, 2 without a cache): 2.0x at p50" in text
    document = json.loads(render_json(comparison))
    assert document["speedup_same_images"]["p50_ratio"] == 2.0
    assert document["images_differ"] is True


def test_no_same_images_speedup_when_hits_and_pulls_are_different_images() -> None:
    nginx, busybox = "docker.io/library/nginx:1.27", "docker.io/library/busybox:1.36"
    records = [_of(nginx, record(1, CacheOutcome.AUTO_HIT, 4.0)), _of(busybox, record(2, CacheOutcome.NONE, 3.0))]
    comparison = build_comparison(records)
    assert comparison.same_images is None
    assert "this compares different images" in render_text(comparison)
    # Every Pod of one image set: nothing to add.
    alike = build_comparison([record(1, CacheOutcome.AUTO_HIT, 4.0), record(2, CacheOutcome.NONE, 40.0)])
    assert not alike.images_differ
    assert "same images" not in render_text(alike)


@pytest.mark.parametrize(
    "outcomes",
    [
        [CacheOutcome.MISS, CacheOutcome.NONE],
        [CacheOutcome.AUTO_HIT, CacheOutcome.PARTIAL],
        [],
    ],
)
def test_no_speedup_without_both_groups(outcomes: list[CacheOutcome]) -> None:
    comparison = build_comparison([record(i, outcome, 10.0) for i, outcome in enumerate(outcomes)])
    assert comparison.speedup is None
    assert "speed-up: needs both" in render_text(comparison)


def test_partial_and_failed_are_rows_but_in_neither_speedup_group() -> None:
    records = [
        record(1, CacheOutcome.AUTO_HIT, 4.0),
        record(2, CacheOutcome.MISS, 40.0),
        record(3, CacheOutcome.PARTIAL, 1000.0),
        record(4, CacheOutcome.FAILED, 0.1),
    ]
    comparison = build_comparison(records)
    assert [row.outcome for row in comparison.rows] == [
        CacheOutcome.AUTO_HIT,
        CacheOutcome.PARTIAL,
        CacheOutcome.MISS,
        CacheOutcome.FAILED,
    ]
    assert comparison.speedup is not None
    assert comparison.speedup.p50_ratio == pytest.approx(10.0)


# ---- filters -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("app=web", {"app": "web"}, True),
        ("app==web", {"app": "web"}, True),
        ("app=web", {"app": "api"}, False),
        ("app!=web", {"app": "api"}, True),
        ("app!=web", {}, True),
        ("app in (web, api)", {"app": "api"}, True),
        ("app notin (web,api)", {"app": "api"}, False),
        ("app notin (web)", {}, True),
        ("tier", {"tier": "x"}, True),
        ("tier", {}, False),
        ("!tier", {}, True),
        ("app=web,tier=front", {"app": "web", "tier": "back"}, False),
        ("app in (web,api),tier", {"app": "web", "tier": "back"}, True),
        ("example.com/team=a", {"example.com/team": "a"}, True),
        ("", {"any": "thing"}, True),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(selector).matches(labels) is expected


@pytest.mark.parametrize(
    ("selector", "needle"),
    [
        ("app=web,", "empty term"),
        ("app in (web", "unbalanced"),
        ("-app=web", "invalid label key"),
        ("app=we b", "invalid label value"),
        ("app=" + "x" * 64, "invalid label value"),
        ("=web", "invalid label key"),
    ],
)
def test_bad_selectors_name_the_problem(selector: str, needle: str) -> None:
    with pytest.raises(ReportError, match=needle):
        parse_selector(selector)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-01T10:00:00Z", datetime(2026, 1, 1, 10, tzinfo=UTC)),
        ("2026-01-01T10:00", datetime(2026, 1, 1, 10, tzinfo=UTC)),
        ("2026-01-01T12:00:00+02:00", datetime(2026, 1, 1, 10, tzinfo=UTC)),
        ("2026-01-01", datetime(2026, 1, 1, tzinfo=UTC)),
    ],
)
def test_times_are_iso_and_utc_by_default(text: str, expected: datetime) -> None:
    assert parse_time(text, "--since") == expected


def test_a_bad_time_names_the_flag() -> None:
    with pytest.raises(ReportError, match="--until 'yesterday': not an ISO 8601 time"):
        parse_time("yesterday", "--until")


def test_filters_by_namespace_selector_and_window() -> None:
    records = [
        record(1, CacheOutcome.NONE, 10.0, namespace="a", labels={"app": "web"}, started_after=10),
        record(2, CacheOutcome.NONE, 20.0, namespace="a", labels={"app": "api"}, started_after=20),
        record(3, CacheOutcome.NONE, 30.0, namespace="b", labels={"app": "web"}, started_after=30),
        record(4, CacheOutcome.NONE, 40.0, namespace="a", labels={"app": "web"}, started_after=40),
    ]

    def kept(report_filter: ReportFilter) -> list[float]:
        return list(build_comparison(records, report_filter).rows[0].startup_seconds)

    assert kept(ReportFilter(namespace="a")) == [10.0, 20.0, 40.0]
    assert kept(ReportFilter(selector=parse_selector("app=web"))) == [10.0, 30.0, 40.0]
    window = ReportFilter(since=T0 + timedelta(seconds=20), until=T0 + timedelta(seconds=40))
    assert kept(window) == [20.0, 30.0]
    assert build_comparison(records, window).filters == {
        "since": "2026-01-01T00:00:20Z",
        "until": "2026-01-01T00:00:40Z",
    }
    assert build_comparison(records, ReportFilter(namespace="zzz")).rows == ()


def test_an_empty_window_is_a_problem() -> None:
    assert ReportFilter(since=T0, until=T0).problems()
    assert not ReportFilter(since=T0, until=T0 + timedelta(seconds=1)).problems()
    assert not ReportFilter(selector=LabelSelector()).problems()


# ---- renderings --------------------------------------------------------------------------------


def test_text_table_shows_every_outcome_and_the_speedup() -> None:
    text = render_text(build_comparison(sample()))
    lines = text.splitlines()
    assert lines[0] == "Pod start-up by cache outcome (20 Pods; filters: none)"
    miss_line = next(line for line in lines if line.startswith("miss"))
    assert miss_line.split()[:7] == ["miss", "5", "52.0", "54.0", "54.0", "52.0", "54.0"]
    assert "1.93 GB" in miss_line
    assert re.search(
        r"speed-up of cache hits \(12 Pods\) over starts without a cache \(8 Pods\): \d+\.\dx at p50", text
    )
    assert "nearest-rank" in lines[-1]


def test_json_has_every_number_unrounded() -> None:
    data = json.loads(render_json(build_comparison(sample(), ReportFilter(namespace="default"))))
    assert data["percentile_method"] == "nearest-rank"
    assert data["filters"] == {"namespace": "default"}
    assert data["pods"] == 17
    auto = next(row for row in data["outcomes"] if row["outcome"] == "auto_hit")
    assert auto["p50_seconds"] == pytest.approx(4.4)
    assert auto["mean_seconds"] == pytest.approx(4.45)
    assert data["speedup"]["hit_outcomes"] == ["auto_hit", "explicit_hit"]
    assert data["speedup"]["no_cache_outcomes"] == ["miss", "none"]


def test_json_speedup_is_null_for_infinite_ratio() -> None:
    data = json.loads(
        render_json(build_comparison([record(1, CacheOutcome.AUTO_HIT, 0.0), record(2, CacheOutcome.MISS, 9.0)]))
    )
    assert data["speedup"]["p50_ratio"] is None


def test_csv_has_a_header_and_one_row_per_outcome() -> None:
    rows = list(csv.DictReader(io.StringIO(render_csv(build_comparison(sample())))))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [row["outcome"] for row in rows] == ["explicit_hit", "auto_hit", "miss", "none"]
    assert float(rows[2]["p50_seconds"]) == 52.0
    assert int(rows[2]["bytes_pulled"]) == 5 * 386_000_000


def test_html_is_self_contained_labelled_and_deterministic() -> None:
    comparison = build_comparison(sample())
    page = render_html(comparison)
    assert page == render_html(build_comparison(list(reversed(sample()))))
    assert page.startswith("<!DOCTYPE html>")
    # Nothing fetched from elsewhere: the only URL is the SVG namespace.
    assert re.findall(r"https?://[^\"' ]+", page) == ["http://www.w3.org/2000/svg"]
    assert "<script" not in page
    assert "<link" not in page
    assert "@import" not in page
    assert AXIS_LABEL in page
    for outcome, count in (("explicit_hit", 2), ("auto_hit", 10), ("miss", 5), ("none", 3)):
        assert f'data-outcome="{outcome}"' in page
        assert f"n = {count}" in page
    # One dot per Pod.
    assert page.count("<circle") == 20


def test_chart_switches_to_a_log_axis_when_times_differ_by_orders_of_magnitude() -> None:
    linear = render_html(build_comparison(sample()))
    log = render_html(build_comparison([record(1, CacheOutcome.AUTO_HIT, 1.0), record(2, CacheOutcome.MISS, 500.0)]))
    assert "log scale" not in linear
    assert "log scale" in log


def test_empty_report_still_renders() -> None:
    comparison = build_comparison([])
    assert "(no Pod starts match)" in render_text(comparison)
    assert "no Pod starts match" in render_html(comparison)
    assert json.loads(render_json(comparison))["outcomes"] == []
    assert render_csv(comparison).strip() == ",".join(CSV_COLUMNS)


@pytest.mark.parametrize(
    ("db", "expected"),
    [
        ("/var/lib/vk/registry.db", "/var/lib/vk/registry-report.html"),
        ("x.db", "x-report.html"),
        ("postgresql://h/db", "vk-provider-report.html"),
    ],
)
def test_default_chart_path_is_beside_the_database(db: str, expected: str) -> None:
    assert str(default_chart_path(db)) == expected


def test_mean_uses_exact_summation() -> None:
    values = [0.1] * 10
    comparison = build_comparison([record(i, CacheOutcome.NONE, v) for i, v in enumerate(values)])
    assert comparison.rows[0].mean == math.fsum(values) / 10
