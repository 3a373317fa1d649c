"""Two agents share one PostgreSQL registry and one cluster (issue 9).

Two real agent processes (different node names, ``--db postgresql://…`` on the session's own
PostgreSQL server) elect one leader on a Lease. A cache is built once, by the leader, into one
registry row; Pods on the other agent hit it (by its id and by automatic matching); a miss on the
follower creates an automatic cache that the leader builds; when the leader dies the other agent
takes over within the lease duration and goes on building caches; a leader stopped cleanly hands
over at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import AgentProcess
from tests.support.cluster import Cluster
from tests.support.fixtures import unique
from tests.support.postgres import PostgresServer, fresh_database, shared_postgres
from tests.support.wait import wait_for

AUTO = "k8s.aliyun.com/eci-image-cache"
EXPLICIT = "k8s.aliyun.com/eci-image-snapshot-id"
MATCHED = "k8s.aliyun.com/eci-matched-image-cache"
LEASE_NAMESPACE, LEASE_NAME = "kube-system", "vk-provider-imagecaches"
SETTINGS = {
    "pull": {"time_scale": 4, "jitter": 0, "cache_build_bandwidth": 20e6},
    "caches": {"snapshot_seconds": 1, "leader_election": "auto"},
}
TAKEOVER_LIMIT_SECONDS = 20 + 2  # lease duration (15 s) + a retry and a renew interval of slack


@pytest.fixture(scope="session")
def postgres(request: pytest.FixtureRequest) -> PostgresServer:
    return shared_postgres(request.config)


@pytest.fixture
def pg_database(postgres: PostgresServer) -> Iterator[str]:
    with fresh_database(postgres) as url:
        yield url


@pytest.fixture
def caches(cluster: Cluster) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        cluster.kubectl("delete", "imagecache", name, "--ignore-not-found", "--wait=false", check=False)


def apply(cluster: Cluster, *objects: dict[str, Any], namespace: str = "") -> None:
    args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
    cluster.kubectl(*args, input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))


def image_cache(name: str, images: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "eci.alibabacloud.com/v1",
        "kind": "ImageCache",
        "metadata": {"name": name},
        "spec": {"images": images, "imageCacheSize": 20},
    }


def pod(name: str, node: str, annotations: dict[str, str], image: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "app", "image": image, "imagePullPolicy": "IfNotPresent"}],
        },
    }


def imc_status(cluster: Cluster, name: str) -> dict[str, Any]:
    status: dict[str, Any] = ((cluster.get_json("imagecache", name) or {}).get("status")) or {}
    return status


def wait_ready(cluster: Cluster, name: str, timeout: float = 60) -> dict[str, Any]:
    wait_for(lambda: imc_status(cluster, name).get("phase") == "Ready", timeout=timeout, what=f"{name} Ready")
    return imc_status(cluster, name)


def holder(cluster: Cluster) -> str:
    lease = cluster.get_json("lease", "-n", LEASE_NAMESPACE, LEASE_NAME) or {}
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


def holder_node(cluster: Cluster, agents: list[AgentProcess]) -> AgentProcess | None:
    held = holder(cluster)
    return next((a for a in agents if a.alive() and held.startswith(f"{a.node_name}_")), None)


def hit_event(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    events = cluster.get_json("events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")["items"]
    return next((e for e in events if e["reason"] == "SuccessfulHitImageCache"), None)


def leader_and_follower(cluster: Cluster, agents: list[AgentProcess]) -> tuple[AgentProcess, AgentProcess]:
    """Once both agents' Nodes are Ready and one holds the Lease: the leader, then the other."""
    for agent in agents:
        agent.wait_ready()
    leader = wait_for(lambda: holder_node(cluster, agents), timeout=30, what="a leader holding the Lease")
    return leader, next(a for a in agents if a is not leader)


def ready_nginx_cache(cluster: Cluster, caches: list[str], prefix: str) -> tuple[str, str]:
    """A user's ImageCache of nginx, once Ready: its name and imc id."""
    name = unique(prefix)
    caches.append(name)
    apply(cluster, image_cache(name, ["nginx:1.7.9"]))
    return name, str(wait_ready(cluster, name)["imageCacheId"])


def wait_followed(follower: AgentProcess, name: str, imc_id: str) -> None:
    wait_for(lambda: f"image cache {name} ({imc_id}): Ready, as the leader reports" in follower.log,
             timeout=30, what="the follower sees the cache Ready")  # fmt: skip


def built_ready(agent: AgentProcess, name: str) -> int:
    """How often this agent's log says it built ``name`` to Ready (the leader's line)."""
    return sum(1 for line in agent.log.splitlines() if f"image cache {name} (" in line and line.endswith(": Ready"))


def test_two_agents_share_one_postgresql_registry(
    cluster: Cluster, workdir: Path, namespace: str, postgres: PostgresServer, pg_database: str, caches: list[str]
) -> None:
    database = pg_database.rsplit("/", 1)[1]
    agents = [
        AgentProcess(
            cluster, workdir / side, node_name=unique(f"vk{side}"), settings=SETTINGS, extra_args=["--db", pg_database]
        )
        for side in ("a", "b")
    ]
    with agents[0], agents[1]:
        leader, follower = leader_and_follower(cluster, agents)

        # A user's ImageCache: built once, by the leader, into one row of the shared registry.
        web, imc_id = ready_nginx_cache(cluster, caches, "shared-web")
        assert postgres.psql(f"SELECT imc_id, phase FROM caches WHERE name = '{web}'", database).split() == [
            f"{imc_id}|Ready"
        ]
        wait_followed(follower, web, imc_id)
        assert (built_ready(leader, web), built_ready(follower, web)) == (1, 0)
        assert "Start to create image cache" not in follower.log

        # Pods on the follower hit it: by its id, and by automatic matching.
        apply(
            cluster,
            pod("by-id", follower.node_name, {EXPLICIT: imc_id}, "nginx:1.7.9"),
            pod("by-match", follower.node_name, {AUTO: "true"}, "nginx:1.7.9"),
            namespace=namespace,
        )
        for name in ("by-id", "by-match"):
            event = wait_for(functools.partial(hit_event, cluster, namespace, name), timeout=60, what=f"{name} hit")
            assert imc_id in event["message"]
            annotations = cluster.get_json("pod", name, "-n", namespace)["metadata"]["annotations"]
            assert annotations[MATCHED] == imc_id
        recorded = wait_for(
            lambda: (
                (
                    rows := postgres.psql(
                        f"SELECT node, cache_outcome FROM pod_starts WHERE namespace = '{namespace}' ORDER BY name",
                        database,
                    ).split()
                )
                and len(rows) == 2
                and rows
            ),
            timeout=60,
            what="both Pod starts recorded",
        )
        assert recorded == [f"{follower.node_name}|explicit_hit", f"{follower.node_name}|auto_hit"]
        assert postgres.psql(f"SELECT hit_count FROM caches WHERE name = '{web}'", database).strip() == "2"

        # A miss on the follower creates an automatic cache; the leader builds it.
        apply(cluster, pod("miss", follower.node_name, {AUTO: "true"}, "busybox:1.36"), namespace=namespace)
        instance = wait_for(
            lambda: (cluster.get_json("pod", "miss", "-n", namespace)["metadata"].get("annotations") or {}).get(
                "k8s.aliyun.com/eci-instance-id"
            ),
            timeout=60,
            what="the missing Pod's instance id",
        )
        auto = f"auto-create-for-{instance}"
        caches.append(auto)
        wait_ready(cluster, auto)
        assert (built_ready(leader, auto), built_ready(follower, auto)) == (1, 0)
        automatic = postgres.psql(f"SELECT count(*) FROM caches WHERE name = '{auto}' AND automatic", database)
        assert automatic.strip() == "1"

        # The leader dies: the follower takes over within the lease duration and builds new caches.
        killed_at = time.monotonic()
        leader.stop(signal.SIGKILL, release_lease=False)
        wait_for(lambda: holder_node(cluster, agents) is follower, timeout=TAKEOVER_LIMIT_SECONDS + 5,
                 what="the follower takes the Lease")  # fmt: skip
        takeover = time.monotonic() - killed_at
        assert takeover < TAKEOVER_LIMIT_SECONDS, takeover
        later = unique("shared-later")
        caches.append(later)
        apply(cluster, image_cache(later, ["busybox:1.37"]))
        wait_ready(cluster, later)
        assert built_ready(follower, later) == 1

        # The old leader comes back as a follower; the new leader, stopped cleanly, hands over at once.
        leader.start()
        leader.wait_ready()
        assert holder_node(cluster, agents) is follower
        stopped_at = time.monotonic()
        assert follower.stop(signal.SIGTERM) == 0
        wait_for(lambda: holder_node(cluster, agents) is leader, timeout=10, what="the restarted agent leads")
        handover = time.monotonic() - stopped_at
        print(f"takeover after SIGKILL: {takeover:.1f} s; handover after SIGTERM: {handover:.1f} s")
        assert handover < 10, handover
        rows = postgres.psql("SELECT name FROM caches ORDER BY name", database).split()
        assert sorted([web, auto, later]) == [r for r in rows if r in (web, auto, later)]


def test_two_agents_with_a_sqlite_file_each_share_the_clusters_caches_without_a_fight(
    cluster: Cluster, workdir: Path, namespace: str, caches: list[str]
) -> None:
    """The README's second `run` example beside a running agent: ImageCache objects are the
    cluster's, so one agent builds and writes their status; the other follows the objects."""
    agents = [AgentProcess(cluster, workdir / side, node_name=unique(f"vk{side}"), settings=SETTINGS) for side in "ab"]
    with agents[0], agents[1]:
        leader, follower = leader_and_follower(cluster, agents)
        web, imc_id = ready_nginx_cache(cluster, caches, "sqlite-web")
        wait_followed(follower, web, imc_id)
        assert (built_ready(leader, web), built_ready(follower, web)) == (1, 0)
        # Nobody rewrites the status any more (before: both agents, each with its own id, many
        # times a second): a Pod on the follower hits the cache, and the object stays as it was.
        version = cluster.get_json("imagecache", web)["metadata"]["resourceVersion"]
        apply(cluster, pod("by-id", follower.node_name, {EXPLICIT: imc_id}, "nginx:1.7.9"), namespace=namespace)
        event = wait_for(functools.partial(hit_event, cluster, namespace, "by-id"), timeout=60, what="by-id hit")
        assert imc_id in event["message"]
        now = cluster.get_json("imagecache", web)
        assert (now["metadata"]["resourceVersion"], now["status"]["imageCacheId"]) == (version, imc_id)
        with contextlib.closing(sqlite3.connect(f"file:{leader.db}?mode=ro", uri=True)) as db:
            assert db.execute("SELECT imc_id, phase FROM caches WHERE name = ?", (web,)).fetchall() == [
                (imc_id, "Ready")
            ]
