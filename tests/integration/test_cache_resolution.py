"""Pods resolve image caches as ECI does: the seed's four examples, and a burst of misses (issue 5)."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import AgentProcess
from tests.support.cluster import Cluster
from tests.support.fixtures import unique
from tests.support.wait import wait_for

AUTO_SEED = "k8s.aliyun.com/eci-image-cache"
EXPLICIT_SEED = "k8s.aliyun.com/eci-image-snapshot-id"
MATCHED = "k8s.aliyun.com/eci-matched-image-cache"
INSTANCE = "k8s.aliyun.com/eci-instance-id"
NGINX = "docker.io/library/nginx:1.7.9"
# time_scale 2 keeps a miss (a ~39 MB pull) seconds longer than a hit, measurable on Pod timestamps.
SETTINGS = {
    "pull": {"time_scale": 2, "jitter": 0, "cache_build_bandwidth": 10e6},
    "caches": {"snapshot_seconds": 1},
}


@pytest.fixture
def caches(cluster: Cluster) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        cluster.kubectl("delete", "imagecache", name, "--ignore-not-found", "--wait=false", check=False)


def seed_pod(name: str, node: str, annotations: dict[str, str], image: str = "nginx:1.7.9") -> dict[str, Any]:
    """The seed's Pod example, on this test's node."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "nodeName": node,
            "containers": [
                {
                    "name": "nginx",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "resources": {
                        "limits": {"cpu": "300m", "memory": "200Mi"},
                        "requests": {"cpu": "200m", "memory": "100Mi"},
                    },
                }
            ],
        },
    }


def seed_deployment(name: str, node: str, annotations: dict[str, str]) -> dict[str, Any]:
    """The seed's Deployment example, on this test's node."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": annotations},
                "spec": {
                    "nodeName": node,
                    "containers": [{"name": "nginx", "image": "nginx:1.7.9", "imagePullPolicy": "IfNotPresent"}],
                },
            },
        },
    }


def apply(cluster: Cluster, namespace: str, *objects: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                           "items": list(objects)}))  # fmt: skip


def pod(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = cluster.get_json("pod", name, "-n", namespace)
    return found


def phase(cluster: Cluster, namespace: str, name: str) -> str:
    return str((pod(cluster, namespace, name) or {}).get("status", {}).get("phase", ""))


def events(cluster: Cluster, namespace: str, name: str | None = None) -> list[dict[str, Any]]:
    args = ["events", "-n", namespace]
    if name:
        args += ["--field-selector", f"involvedObject.name={name}"]
    items: list[dict[str, Any]] = cluster.get_json(*args)["items"]
    return items


def reasons(cluster: Cluster, namespace: str, name: str) -> list[str]:
    return [e["reason"] for e in events(cluster, namespace, name)]


def wait_reason(cluster: Cluster, namespace: str, name: str, reason: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        return next((e for e in events(cluster, namespace, name) if e["reason"] == reason), None)

    event: dict[str, Any] = wait_for(found, timeout=30, what=f"{reason} on {name}")
    return event


def startup_seconds(obj: dict[str, Any]) -> float:
    created = datetime.fromisoformat(obj["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
    started = datetime.fromisoformat(
        obj["status"]["containerStatuses"][0]["state"]["running"]["startedAt"].replace("Z", "+00:00")
    )
    return (started - created).total_seconds()


def imc_status(cluster: Cluster, name: str) -> dict[str, Any]:
    obj = cluster.get_json("imagecache", name)
    status: dict[str, Any] = (obj or {}).get("status") or {}
    return status


def query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return list(conn.execute(sql, args))


def test_the_seed_examples(cluster: Cluster, workdir: Path, namespace: str, caches: list[str]) -> None:
    node = unique("vk")
    ns = namespace
    with AgentProcess(cluster, workdir, node_name=node, settings=SETTINGS) as agent:
        agent.wait_ready()

        # Automatic matching with no cache: Missed, an automatic cache is made, the Pod pulls.
        apply(cluster, ns, seed_pod("nginx-auto-match", node, {AUTO_SEED: "true"}))
        wait_for(lambda: phase(cluster, ns, "nginx-auto-match") == "Running", timeout=60, what="miss Running")
        missed = wait_reason(cluster, ns, "nginx-auto-match", "ImageCacheMissed")
        assert missed["type"] == "Warning"
        assert missed["source"]["component"] == "EciService"
        assert missed["message"] == "[eci.imagecache]Missed image cache."
        created = wait_reason(cluster, ns, "nginx-auto-match", "ImageCacheAutoCreated")
        match = re.fullmatch(r"\[eci\.imagecache\]Image cache (imc-[a-z0-9]{20}) is auto created", created["message"])
        assert match, created["message"]
        auto_id = match.group(1)
        first = pod(cluster, ns, "nginx-auto-match")
        assert "Pulling" in reasons(cluster, ns, "nginx-auto-match")
        auto_name = f"auto-create-for-{first['metadata']['annotations'][INSTANCE]}"
        caches.append(auto_name)
        auto = cluster.get_json("imagecache", auto_name)
        assert auto["spec"] == {"images": [NGINX], "imageCacheSize": 30}
        wait_for(lambda: imc_status(cluster, auto_name).get("phase") == "Ready", timeout=60, what="auto cache Ready")
        assert imc_status(cluster, auto_name)["imageCacheId"] == auto_id
        assert query(agent.db, "select imc_id, automatic, size_gib from caches where name = ?", auto_name) == [
            (auto_id, 1, 30)
        ]

        # Once Ready, another automatic Pod hits it, is annotated, pulls nothing and starts faster.
        apply(cluster, ns, seed_pod("nginx-auto-match-2", node, {AUTO_SEED: "true"}))
        wait_for(lambda: phase(cluster, ns, "nginx-auto-match-2") == "Running", timeout=60, what="hit Running")
        hit = wait_reason(cluster, ns, "nginx-auto-match-2", "SuccessfulHitImageCache")
        assert hit["message"] == (
            f"[eci.imagecache]Successfully hit image cache {auto_id}, eci will be scheduled with this image cache."
        )
        second = pod(cluster, ns, "nginx-auto-match-2")
        assert second["metadata"]["annotations"][MATCHED] == auto_id
        pulled = wait_reason(cluster, ns, "nginx-auto-match-2", "Pulled")
        assert "already present on machine" in pulled["message"]
        assert "Pulling" not in reasons(cluster, ns, "nginx-auto-match-2")
        assert startup_seconds(second) < startup_seconds(first), (startup_seconds(second), startup_seconds(first))
        matched_at = query(agent.db, "select last_matched_at, hit_count from caches where imc_id = ?", auto_id)
        assert matched_at[0][0] is not None
        assert matched_at[0][1] == 1

        # Explicit: the Pod and the Deployment naming the Ready cache hit it.
        explicit = {EXPLICIT_SEED: auto_id}
        apply(
            cluster,
            ns,
            seed_pod("nginx-imagecache-id", node, explicit),
            seed_deployment("nginx-deployment-imc", node, explicit),
            seed_deployment("nginx-deployment", node, {AUTO_SEED: "true"}),
        )
        wait_for(lambda: phase(cluster, ns, "nginx-imagecache-id") == "Running", timeout=60, what="explicit Running")
        wait_reason(cluster, ns, "nginx-imagecache-id", "SuccessfulHitImageCache")
        assert pod(cluster, ns, "nginx-imagecache-id")["metadata"]["annotations"][MATCHED] == auto_id

        def deployment_pods_hit() -> bool:
            pods = cluster.get_json("pods", "-n", ns, "-l", "app in (nginx-deployment, nginx-deployment-imc)")["items"]
            return len(pods) == 4 and all(
                p["status"].get("phase") == "Running" and p["metadata"].get("annotations", {}).get(MATCHED) == auto_id
                for p in pods
            )

        wait_for(deployment_pods_hit, timeout=90, what="the Deployments' Pods Running on the cache")

        # Explicit, unknown id: Failed, ImageCacheNotFound.
        apply(cluster, ns, seed_pod("nginx-unknown-id", node, {EXPLICIT_SEED: "imc-2ze5tm5gehgtiigaxxxx"}))
        wait_for(lambda: phase(cluster, ns, "nginx-unknown-id") == "Failed", timeout=30, what="Failed")
        failed = pod(cluster, ns, "nginx-unknown-id")
        assert failed["status"]["reason"] == "ImageCacheNotFound"
        not_found = wait_reason(cluster, ns, "nginx-unknown-id", "ImageCacheNotFound")
        assert not_found["message"].startswith("The specified image cache imc-2ze5tm5gehgtiigaxxxx")
        assert not_found["message"].endswith("does not exist.")
        assert not_found["type"] == "Warning"

        # Explicit, a cache still Creating: Failed, ImageCacheNotComplete.
        slow = unique("slow")
        caches.append(slow)
        cluster.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "eci.alibabacloud.com/v1", "kind": "ImageCache", "metadata": {"name": slow},
            "spec": {"images": ["python:3.12"]},
        }))  # fmt: skip
        wait_for(lambda: imc_status(cluster, slow).get("phase") == "Creating", timeout=30, what="slow Creating")
        slow_id = imc_status(cluster, slow)["imageCacheId"]
        apply(cluster, ns, seed_pod("nginx-not-complete", node, {EXPLICIT_SEED: slow_id}))
        wait_for(lambda: phase(cluster, ns, "nginx-not-complete") == "Failed", timeout=30, what="Failed")
        assert pod(cluster, ns, "nginx-not-complete")["status"]["reason"] == "ImageCacheNotComplete"
        not_complete = wait_reason(cluster, ns, "nginx-not-complete", "ImageCacheNotComplete")
        assert not_complete["message"] == f"The production for specified image cache {slow_id} is not yet complete."
        assert imc_status(cluster, slow)["phase"] == "Creating"

        # Both are recorded (outcome failed, the cache they named, nothing pulled): the report counts them.
        def failed_rows() -> list[tuple[Any, ...]]:
            return query(agent.db, "select name, imc_id, bytes_pulled from pod_starts "
                                   "where cache_outcome = 'failed' order by name")  # fmt: skip

        wait_for(lambda: len(failed_rows()) == 2, timeout=30, what="the failed Pods recorded")
        assert failed_rows() == [
            ("nginx-not-complete", slow_id, 0),
            ("nginx-unknown-id", "imc-2ze5tm5gehgtiigaxxxx", 0),
        ]


def test_fifty_pods_missing_at_once_share_one_automatic_cache(
    cluster: Cluster, workdir: Path, namespace: str, caches: list[str]
) -> None:
    node = unique("vk")
    image = f"registry.example.com/burst/{unique('app')}:1"  # in no cache anywhere: a synthetic image
    # A slow build, so that the whole burst misses while the one automatic cache is being built.
    settings = {
        "pull": {"time_scale": 50, "jitter": 0, "cache_build_bandwidth": 1e6},
        "caches": {"snapshot_seconds": 1},
    }
    with AgentProcess(cluster, workdir, node_name=node, settings=settings) as agent:
        agent.wait_ready()
        pods = [seed_pod(f"burst-{i}", node, {AUTO_SEED: "true"}, image=image) for i in range(50)]
        apply(cluster, namespace, *pods)

        def all_running() -> bool:
            items = cluster.get_json("pods", "-n", namespace)["items"]
            return len(items) == 50 and all(p["status"].get("phase") == "Running" for p in items)

        wait_for(all_running, timeout=120, what="50 Pods Running")
        normalised = image
        mine = [
            obj
            for obj in cluster.get_json("imagecaches")["items"]
            if obj["spec"]["images"] == [normalised] or obj["spec"]["images"] == [image]
        ]
        caches.extend(obj["metadata"]["name"] for obj in mine)
        assert len(mine) == 1, [obj["metadata"]["name"] for obj in mine]
        assert mine[0]["metadata"]["labels"]["vk-provider.io/automatic-cache"] == "true"

        # Every Pod either shared the cache being built or, if it came after the build, hit it.
        imc_id = mine[0]["status"]["imageCacheId"]

        def outcomes() -> dict[str, int] | None:
            found = [e for e in events(cluster, namespace) if e["source"].get("component") == "EciService"]
            counts: dict[str, int] = {}
            for event in found:
                counts[event["reason"]] = counts.get(event["reason"], 0) + 1
                assert imc_id in event["message"] or event["reason"] == "ImageCacheMissed", event
            shared = counts.get("ImageCacheAutoCreated", 0)
            done = shared + counts.get("SuccessfulHitImageCache", 0) == 50 and counts.get("ImageCacheMissed") == shared
            return counts if done else None

        counts = wait_for(outcomes, timeout=30, what="an ECI Event of every Pod")
        assert counts["ImageCacheAutoCreated"] >= 1, counts
        rows = query(agent.db, "select count(*) from cache_images where reference = ?", image)
        assert rows == [(1,)]
