"""The ImageCache CRD and its controller against a real kube-apiserver and a real SQLite file (issue 4)."""

from __future__ import annotations

import functools
import json
import re
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.agent import AgentProcess
from tests.support.cluster import Cluster
from tests.support.fixtures import unique
from tests.support.wait import wait_for

CRD = "imagecaches.eci.alibabacloud.com"
IMC_ID = re.compile(r"^imc-[a-z0-9]{20}$")
# Builds slow enough to watch: nginx:1.7.9's 37 MB base layer takes ~2 s at 20 MB/s, then a 2 s snapshot.
WATCHABLE: dict[str, dict[str, Any]] = {
    "pull": {"time_scale": 1, "cache_build_bandwidth": 20e6, "jitter": 0},
    "caches": {"snapshot_seconds": 2},
}


def cache_manifest(name: str, images: list[str], **spec: Any) -> str:
    body = {
        "apiVersion": "eci.alibabacloud.com/v1",
        "kind": "ImageCache",
        "metadata": {"name": name},
        "spec": {"images": images, **spec},
    }
    return json.dumps(body)


def imc(cluster: Cluster, name: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = cluster.get_json("imagecache", name)
    return found


def status_of(cluster: Cluster, name: str) -> dict[str, Any]:
    obj = imc(cluster, name)
    return (obj or {}).get("status") or {}


def has_phase(cluster: Cluster, name: str, phase: str) -> bool:
    return status_of(cluster, name).get("phase") == phase


def query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read the registry as a user would, while the agent runs."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return list(conn.execute(sql, args))


@pytest.fixture
def caches(cluster: Cluster) -> Iterator[list[str]]:
    """Names of ImageCache objects a test makes; deleted afterwards (they are cluster-scoped)."""
    names: list[str] = []
    yield names
    for name in names:
        cluster.kubectl("delete", "imagecache", name, "--ignore-not-found", "--wait=false", check=False)


def test_crd_is_installed_as_the_spec_says_and_validates(cluster: Cluster, workdir: Path) -> None:
    with AgentProcess(cluster, workdir, node_name=unique("vk")) as agent:
        agent.wait_ready()
        crd = cluster.get_json("crd", CRD)
        assert crd["spec"]["scope"] == "Cluster"
        assert crd["spec"]["names"]["shortNames"] == ["imc"]
        version = crd["spec"]["versions"][0]
        assert version["name"] == "v1"
        assert version["subresources"] == {"status": {}}
        assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Age", "Id", "Phase", "Progress"]

        bad = {
            "no images": cache_manifest(unique("bad"), []),
            "21 images": cache_manifest(unique("bad"), [f"busybox:1.{i}" for i in range(21)]),
            "size 10 GiB": cache_manifest(unique("bad"), ["busybox:latest"], imageCacheSize=10),
            "retention 0 days": cache_manifest(unique("bad"), ["busybox:latest"], retentionDays=0),
        }
        for what, manifest in bad.items():
            proc = cluster.kubectl_raw("apply", "-f", "-", input=manifest)
            assert proc.returncode != 0, what
            assert "Invalid value" in proc.stderr or "should be" in proc.stderr, (what, proc.stderr)
        sizes = cluster.kubectl_raw("apply", "-f", "-", input=bad["size 10 GiB"]).stderr
        assert "spec.imageCacheSize" in sizes
        assert "spec.images" in cluster.kubectl_raw("apply", "-f", "-", input=bad["21 images"]).stderr
        # a stranger's spec, defaulted by the API server
        name = unique("defaulted")
        cluster.apply(cache_manifest(name, ["busybox:latest"]))
        try:
            assert imc(cluster, name)["spec"]["imageCacheSize"] == 20  # type: ignore[index]
        finally:
            cluster.kubectl("delete", "imagecache", name, "--wait=false")


def test_a_cache_is_built_to_ready_with_progress_and_shows_in_the_registry(
    cluster: Cluster, workdir: Path, caches: list[str]
) -> None:
    name = unique("imc")
    caches.append(name)
    with AgentProcess(cluster, workdir, node_name=unique("vk"), settings=WATCHABLE) as agent:
        agent.wait_ready()
        cluster.apply(cache_manifest(name, ["nginx:1.7.9", "busybox:latest"], retentionDays=3))
        seen: list[tuple[str, str]] = []

        def ready() -> bool:
            status = status_of(cluster, name)
            seen.append((status.get("phase", ""), status.get("progress", "")))
            return status.get("phase") == "Ready"

        wait_for(ready, timeout=60, interval=0.05, what=f"{name} Ready")
        status = status_of(cluster, name)
        assert IMC_ID.match(status["imageCacheId"]), status
        assert status["progress"] == "100%"
        between = {p for _, p in seen if p.endswith("%") and 0 < int(p[:-1]) < 100}
        assert between, f"no progress strictly between 0% and 100% seen: {seen}"
        assert {"Preparing", "Creating"} & {phase for phase, _ in seen}, seen
        # kubectl's table: the printer columns
        table = cluster.kubectl("get", "imc", name)
        assert re.search(rf"{name}\s+\S+\s+{status['imageCacheId']}\s+Ready\s+100%", table), table
        # events: one per image pulled, and the cache's creation
        messages = [e["message"] for e in status["events"]]
        assert sum("Successfully pulled image docker.io/library/nginx:1.7.9" in m for m in messages) == 1
        assert sum("Successfully pulled image docker.io/library/busybox:latest" in m for m in messages) == 1
        assert f"Successfully created image cache {status['imageCacheId']}" in messages
        for event in status["events"]:
            assert {"count", "firstTimestamp", "lastTimestamp", "message", "type"} <= set(event)
        start = datetime.fromisoformat(status["startTime"].replace("Z", "+00:00"))
        expires = datetime.fromisoformat(status["expireDateTime"].replace("Z", "+00:00"))
        assert abs(expires - start - timedelta(days=3)) < timedelta(minutes=1)
        assert status["lastUpdatedTime"] >= status["startTime"]

        # The registry, read with the sqlite3 command while the agent runs.
        out = subprocess.run(
            [
                "sqlite3",
                str(agent.db),
                f"select imc_id, phase, progress, images from cache_overview where name='{name}'",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert out == (
            f"{status['imageCacheId']}|Ready|100|docker.io/library/nginx:1.7.9 docker.io/library/busybox:latest"
        ), out

        # Deleting the object deletes the registry row.
        cluster.kubectl("delete", "imagecache", name)
        wait_for(
            lambda: not query(agent.db, "select 1 from caches where name = ?", name), timeout=20, what="row deleted"
        )


def test_a_cache_too_small_for_its_images_fails_and_expires_in_24_hours(
    cluster: Cluster, workdir: Path, caches: list[str]
) -> None:
    catalog = workdir / "big-images.yaml"
    catalog.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "images": {
                    "registry.example.com/ml/model-server:1": {
                        "layers": [
                            {"digest": "sha256:" + "ab" * 32, "size": "9 GiB", "uncompressed_size": "25 GiB"},
                        ]
                    }
                },
            }
        )
    )
    name = unique("toosmall")
    unknown = unique("unknown")
    caches.extend([name, unknown])
    settings = {**WATCHABLE, "images": {"extra_catalogs": [str(catalog)], "unknown_images": "fail"}}
    with AgentProcess(cluster, workdir, node_name=unique("vk"), settings=settings) as agent:
        agent.wait_ready()
        cluster.apply(cache_manifest(name, ["busybox:latest", "registry.example.com/ml/model-server:1"]))
        cluster.apply(cache_manifest(unknown, ["registry.example.com/not/in-any-catalog:1"]))
        for failing, words in ((name, "imageCacheSize of 20 GiB"), (unknown, "cannot be resolved")):
            wait_for(functools.partial(has_phase, cluster, failing, "Failed"), timeout=30, what="Failed")
            status = status_of(cluster, failing)
            assert words in status["message"], status
            assert IMC_ID.match(status["imageCacheId"])
            expires = datetime.fromisoformat(status["expireDateTime"].replace("Z", "+00:00"))
            assert abs(expires - datetime.now(UTC) - timedelta(hours=24)) < timedelta(minutes=2), status
            assert any(e["type"] == "Warning" for e in status["events"])
        rows = query(agent.db, "select phase, message from cache_overview where name = ?", name)
        assert rows[0][0] == "Failed"
        assert "imageCacheSize" in rows[0][1]


def test_killed_during_a_build_the_agent_resumes_it_under_the_same_id(
    cluster: Cluster, workdir: Path, caches: list[str]
) -> None:
    name = unique("resume")
    caches.append(name)
    node = unique("vk")
    slow = {**WATCHABLE, "pull": {**WATCHABLE["pull"], "cache_build_bandwidth": 4e6}}
    first = AgentProcess(cluster, workdir, node_name=node, settings=slow).start()
    try:
        first.wait_ready()
        cluster.apply(cache_manifest(name, ["nginx:1.7.9", "busybox:latest"]))
        wait_for(lambda: status_of(cluster, name).get("phase") == "Creating", timeout=30, what="Creating")
        imc_id = status_of(cluster, name)["imageCacheId"]
        first.stop(signal.SIGKILL)
        assert status_of(cluster, name)["phase"] == "Creating"
    finally:
        if first.alive():
            first.stop(signal.SIGKILL)
    with AgentProcess(cluster, workdir, node_name=node, settings=WATCHABLE) as second:
        second.wait_ready()
        wait_for(lambda: status_of(cluster, name).get("phase") == "Ready", timeout=60, what="Ready after restart")
        status = status_of(cluster, name)
        assert status["imageCacheId"] == imc_id
        created = [e for e in status["events"] if e["message"].startswith("Successfully created image cache")]
        assert len(created) == 1, status["events"]
        assert created[0]["count"] == 1, status["events"]
        assert query(second.db, "select imc_id, phase from caches where name = ?", name) == [(imc_id, "Ready")]
        assert query(second.db, "select count(*) from caches where imc_id = ?", imc_id) == [(1,)]


def test_image_changes_apply_only_when_ready(cluster: Cluster, workdir: Path, caches: list[str]) -> None:
    name = unique("change")
    caches.append(name)
    with AgentProcess(cluster, workdir, node_name=unique("vk"), settings=WATCHABLE) as agent:
        agent.wait_ready()
        cluster.apply(cache_manifest(name, ["nginx:1.7.9"]))
        wait_for(lambda: status_of(cluster, name).get("phase") in ("Preparing", "Creating"), timeout=30,
                 what="building")  # fmt: skip
        cluster.apply(cache_manifest(name, ["nginx:1.7.9", "busybox:latest"]))
        wait_for(lambda: "not applied" in (status_of(cluster, name).get("message") or ""), timeout=30,
                 what="refusal message")  # fmt: skip
        wait_for(lambda: status_of(cluster, name).get("phase") == "Ready", timeout=60, what="Ready")
        assert query(agent.db, "select images from cache_overview where name = ?", name) == [
            ("docker.io/library/nginx:1.7.9",)
        ]
        assert "not applied" in status_of(cluster, name)["message"]
        assert status_of(cluster, name)["images"] == ["docker.io/library/nginx:1.7.9"]  # not the refused ones
        # In Ready, a new change is applied: Updating → Ready with the new images.
        cluster.apply(cache_manifest(name, ["busybox:latest", "nginx:1.7.9"]))
        phases: list[str] = []

        def updated() -> bool:
            status = status_of(cluster, name)
            phases.append(status.get("phase", ""))
            return status.get("phase") == "Ready" and not status.get("message") and "Updating" in phases

        wait_for(updated, timeout=60, interval=0.05, what="updated")
        assert query(agent.db, "select images from cache_overview where name = ?", name) == [
            ("docker.io/library/busybox:latest docker.io/library/nginx:1.7.9",)
        ]
        both = ["docker.io/library/busybox:latest", "docker.io/library/nginx:1.7.9"]
        assert status_of(cluster, name)["images"] == both


def test_images_edited_while_no_agent_ran_are_built_when_it_starts_again(
    cluster: Cluster, workdir: Path, caches: list[str]
) -> None:
    name = unique("offline")
    caches.append(name)
    node = unique("vk")
    with AgentProcess(cluster, workdir, node_name=node, settings=WATCHABLE) as first:
        first.wait_ready()
        cluster.apply(cache_manifest(name, ["nginx:1.7.9"]))
        wait_for(lambda: has_phase(cluster, name, "Ready"), timeout=60, what="Ready")
        imc_id = status_of(cluster, name)["imageCacheId"]
    cluster.apply(cache_manifest(name, ["busybox:latest"]))  # nobody runs: nobody sees the edit
    assert status_of(cluster, name)["images"] == ["docker.io/library/nginx:1.7.9"]
    with AgentProcess(cluster, workdir, node_name=node, settings=WATCHABLE) as second:
        second.wait_ready()

        def rebuilt() -> bool:
            status = status_of(cluster, name)
            return status.get("phase") == "Ready" and status.get("images") == ["docker.io/library/busybox:latest"]

        wait_for(rebuilt, timeout=60, what="Ready with the edited images")
        status = status_of(cluster, name)
        assert status["imageCacheId"] == imc_id
        messages = [event["message"] for event in status["events"]]
        assert f"Start to update image cache {imc_id}" in messages, messages
        assert "Successfully pulled image docker.io/library/busybox:latest" in " ".join(messages), messages
        assert query(second.db, "select images from cache_overview where name = ?", name) == [
            ("docker.io/library/busybox:latest",)
        ]


def test_a_flash_cache_is_ready_before_its_snapshot_completes(
    cluster: Cluster, workdir: Path, caches: list[str]
) -> None:
    flash, plain = unique("imc-flash"), unique("imc-plain")
    caches.extend([flash, plain])
    slow_snapshot = {**WATCHABLE, "caches": {"snapshot_seconds": 120}}
    with AgentProcess(cluster, workdir, node_name=unique("vk"), settings=slow_snapshot) as agent:
        agent.wait_ready()
        body = json.loads(cache_manifest(flash, ["busybox:latest"]))
        body["metadata"]["annotations"] = {"k8s.aliyun.com/imc-enable-flash": "true"}
        cluster.apply(json.dumps(body))
        cluster.apply(cache_manifest(plain, ["busybox:latest"]))
        wait_for(lambda: status_of(cluster, flash).get("phase") == "Ready", timeout=30, what=f"{flash} Ready")
        assert status_of(cluster, plain).get("phase") == "Creating"  # still in its 120 s snapshot step
        assert status_of(cluster, flash)["progress"] == "100%"
