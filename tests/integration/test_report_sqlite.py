"""The report's numbers equal what ``sqlite3`` returns from the documented views and queries.

A simulated run fills a real SQLite file; the ``sqlite3`` command line tool (``apt-get install
sqlite3``) then reads ``pod_start_by_outcome`` and the nearest-rank percentile query from
docs/report.md, and ``vk-provider report --json`` must agree with both.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vk_provider.report import ReportFilter, build_comparison, comparison_to_dict, load_records
from vk_provider.simulate import load_workload, simulate, store

ROOT = Path(__file__).resolve().parents[2]

# Nearest rank: the value at 1-based rank ceil(p * n / 100), in integer arithmetic.
PERCENTILE_SQL = """
SELECT cache_outcome,
       max(CASE WHEN n = (50 * total + 99) / 100 THEN startup_seconds END) AS p50,
       max(CASE WHEN n = (90 * total + 99) / 100 THEN startup_seconds END) AS p90,
       max(CASE WHEN n = (99 * total + 99) / 100 THEN startup_seconds END) AS p99
FROM (SELECT cache_outcome, startup_seconds,
             row_number() OVER (PARTITION BY cache_outcome ORDER BY startup_seconds) AS n,
             count(*) OVER (PARTITION BY cache_outcome) AS total
      FROM pod_starts {where})
GROUP BY cache_outcome
"""


def sqlite_json(db: Path, sql: str) -> list[dict[str, Any]]:
    assert shutil.which("sqlite3"), "the sqlite3 command line tool is needed (apt-get install sqlite3)"
    proc = subprocess.run(
        ["sqlite3", "-readonly", "-json", str(db), sql], capture_output=True, text=True, timeout=30, check=True
    )
    rows: list[dict[str, Any]] = json.loads(proc.stdout or "[]")
    return rows


@pytest.fixture(scope="module")
def filled_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("report") / "registry.db"
    result = simulate(load_workload(ROOT / "config" / "workload-burst.yaml"))
    summary = asyncio.run(store(result, str(db)))
    assert summary.recorded == 1000
    return db


def report_json(db: Path, *flags: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "vk_provider", "report", "--db", str(db), "--json", "--no-chart", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
    )
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


@pytest.mark.parametrize(
    ("flags", "where", "report_filter"),
    [
        ((), "", ReportFilter()),
        (("--namespace", "shop"), "WHERE namespace = 'shop'", ReportFilter(namespace="shop")),
    ],
)
def test_report_equals_the_view_and_the_percentile_query(
    filled_db: Path, flags: tuple[str, ...], where: str, report_filter: ReportFilter
) -> None:
    data = report_json(filled_db, *flags)
    by_outcome = {row["outcome"]: row for row in data["outcomes"]}
    if where:
        view_sql = (
            "SELECT cache_outcome, count(*) AS pods, avg(startup_seconds) AS avg_startup_seconds, "
            "min(startup_seconds) AS min_startup_seconds, max(startup_seconds) AS max_startup_seconds, "
            f"avg(pull_seconds) AS avg_pull_seconds, sum(bytes_pulled) AS total_bytes_pulled FROM pod_starts {where} "
            "GROUP BY cache_outcome"
        )
    else:
        view_sql = "SELECT * FROM pod_start_by_outcome"
    view = {row["cache_outcome"]: row for row in sqlite_json(filled_db, view_sql)}
    assert set(view) == set(by_outcome)
    assert len(view) >= 3
    for outcome, row in view.items():
        mine = by_outcome[outcome]
        assert mine["pods"] == row["pods"]
        assert mine["mean_seconds"] == pytest.approx(row["avg_startup_seconds"], rel=1e-12)
        assert mine["min_seconds"] == row["min_startup_seconds"]
        assert mine["max_seconds"] == row["max_startup_seconds"]
        assert mine["mean_pull_seconds"] == pytest.approx(row["avg_pull_seconds"], rel=1e-12)
        assert mine["bytes_pulled"] == row["total_bytes_pulled"]
    for row in sqlite_json(filled_db, PERCENTILE_SQL.format(where=where)):
        mine = by_outcome[row["cache_outcome"]]
        assert (mine["p50_seconds"], mine["p90_seconds"], mine["p99_seconds"]) == (row["p50"], row["p90"], row["p99"])
    assert data["pods"] == sum(row["pods"] for row in view.values())
    # The command line and the library agree.
    in_process = comparison_to_dict(build_comparison(asyncio.run(load_records(str(filled_db), report_filter))))
    in_process["filters"] = data["filters"]
    assert in_process == data


def test_selector_and_window_match_sql(filled_db: Path) -> None:
    first, last = sqlite_json(filled_db, "SELECT min(started_at) AS a, max(started_at) AS b FROM pod_starts")[
        0
    ].values()
    middle = sqlite_json(filled_db, "SELECT started_at FROM pod_starts ORDER BY started_at LIMIT 1 OFFSET 500")[0][
        "started_at"
    ]
    since = middle.replace(" ", "T") + "Z"
    data = report_json(filled_db, "--selector", "tier=backend,app!=jobs", "--since", since)
    rows = sqlite_json(
        filled_db,
        "SELECT cache_outcome, count(*) AS pods, sum(bytes_pulled) AS bytes FROM pod_starts "
        "WHERE json_extract(labels, '$.tier') = 'backend' AND json_extract(labels, '$.app') != 'jobs' "
        f"AND started_at >= '{middle}' GROUP BY cache_outcome",
    )
    assert {row["cache_outcome"]: (row["pods"], row["bytes"]) for row in rows} == {
        row["outcome"]: (row["pods"], row["bytes_pulled"]) for row in data["outcomes"]
    }
    assert first < middle < last
    assert data["filters"] == {"selector": "tier=backend,app!=jobs", "since": since}


def test_cache_overview_counts_the_hits(filled_db: Path) -> None:
    caches = {
        row["name"]: row for row in sqlite_json(filled_db, "SELECT name, hit_count, pod_starts FROM cache_overview")
    }
    recorded = {
        row["imc_id"]: row["pods"]
        for row in sqlite_json(
            filled_db,
            "SELECT imc_id, count(*) AS pods FROM pod_starts WHERE cache_outcome IN ('explicit_hit', 'auto_hit') "
            "GROUP BY imc_id",
        )
    }
    assert caches["web-cache"]["hit_count"] > 0
    assert sum(row["hit_count"] for row in caches.values()) == sum(recorded.values())
    assert all(row["hit_count"] == row["pod_starts"] for row in caches.values())
