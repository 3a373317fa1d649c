"""Pod starts are recorded once, exposed as kubelet-style metrics, and the report agrees with SQL."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import ROOT, Cluster
from tests.support.fixtures import pod_manifest, start_agent
from tests.support.wait import wait_for
from vk_provider.catalogs import load_catalogs

SETTINGS = {"pull": {"time_scale": 20, "jitter": 0}, "caches": {"snapshot_seconds": 1}}


def running(cluster: Cluster, namespace: str, name: str) -> bool:
    found = cluster.get_json("pod", name, "-n", namespace)
    return bool(found) and found["status"].get("phase") == "Running"


def recorded(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("select cache_outcome, count(*) from pod_starts group by cache_outcome").fetchall())


def metric_counts(text: str, name: str) -> dict[str, int]:
    pattern = re.compile(rf'^{name}_count{{cache_outcome="([a-z_]+)"}} (\d+)$', re.M)
    return {outcome: int(n) for outcome, n in pattern.findall(text)}


def forget_caches(cluster: Cluster, names: list[str]) -> None:
    cluster.kubectl("delete", "imagecache", *names, "--ignore-not-found", "--wait=false", check=False)


def test_starts_are_recorded_measured_and_reported(
    cluster: Cluster, workdir: Path, namespace: str, request: pytest.FixtureRequest
) -> None:
    with start_agent(cluster, workdir, SETTINGS) as agent:
        node = agent.node_name

        def create(manifest: dict[str, Any]) -> None:
            cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(manifest))

        create(pod_manifest("baseline", node))
        create(pod_manifest("miss", node, annotations={"k8s.aliyun.com/eci-image-cache": "true"}))
        wait_for(lambda: running(cluster, namespace, "baseline") and running(cluster, namespace, "miss"), timeout=60,
                 what="baseline and miss Running")  # fmt: skip

        def ready_cache() -> Any:
            items = cluster.get_json("imagecaches")["items"]
            return [c for c in items if c.get("status", {}).get("phase") == "Ready"]

        made = [c["metadata"]["name"] for c in wait_for(ready_cache, timeout=60, what="the automatic cache Ready")]
        # The cache is cluster-scoped: left Ready, other tests' nginx Pods would hit it.
        request.addfinalizer(lambda: forget_caches(cluster, made))
        create(pod_manifest("hit", node, annotations={"k8s.aliyun.com/eci-image-cache": "true"}))
        wait_for(lambda: running(cluster, namespace, "hit"), timeout=60, what="hit Running")
        wait_for(lambda: sum(recorded(agent.db).values()) == 3, timeout=20, what="3 starts recorded")
        assert recorded(agent.db) == {"none": 1, "miss": 1, "auto_hit": 1}

        # /metrics through the API server's node proxy (the API server's kubelet client certificate).
        text = cluster.kubectl("get", "--raw", f"/api/v1/nodes/{node}/proxy/metrics")
        assert metric_counts(text, "kubelet_pod_start_total_duration_seconds") == {"none": 1, "miss": 1, "auto_hit": 1}
        assert metric_counts(text, "kubelet_pod_start_sli_duration_seconds") == {"none": 1, "miss": 1, "auto_hit": 1}
        assert 'kubelet_image_pull_duration_seconds_bucket{cache_outcome="miss"' in text
        assert "vk_provider_image_cache_auto_created_total 1" in text
        assert 'vk_provider_image_cache_hits_total{kind="auto_hit"} 1' in text

        # The report's numbers are the view's numbers.
        report = subprocess.run(
            [sys.executable, "-m", "vk_provider", "report", "--db", str(agent.db), "--json", "--no-chart"],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        rows = {r["outcome"]: r for r in json.loads(report.stdout)["outcomes"]}
        view = subprocess.run(
            ["sqlite3", "-json", str(agent.db), "select * from pod_start_by_outcome"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        for row in json.loads(view.stdout):
            mine = rows[row["cache_outcome"]]
            assert mine["pods"] == row["pods"]
            assert abs(mine["mean_seconds"] - row["avg_startup_seconds"]) < 1e-6
            assert mine["bytes_pulled"] == row["total_bytes_pulled"]
        # Queried with SQL: the images the Pods used are stored with their layers, under the
        # reference the Pods' images are recorded with, so the two join.
        with sqlite3.connect(agent.db) as conn:
            joined = conn.execute(
                "select distinct i.reference, i.source, o.layer_count from pod_start_images p "
                "join images i on i.reference = p.reference join image_overview o on o.reference = i.reference"
            ).fetchall()
        layers = len(load_catalogs().get("nginx:1.7.9").layers)  # type: ignore[union-attr]
        assert joined == [("docker.io/library/nginx:1.7.9", "catalog", layers)]
        # A hit starts faster than a miss of the same image.
        assert rows["auto_hit"]["p50_seconds"] < rows["miss"]["p50_seconds"]
        assert rows["auto_hit"]["bytes_pulled"] == 0
        assert rows["miss"]["bytes_pulled"] > 0
