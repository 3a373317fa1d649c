"""Run the agent in-process for a benchmark, with settings tuned for measuring, and bulk-create Pods."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from vk_provider.app import Agent
from vk_provider.config import Settings, load_settings
from vk_provider.kube.session import KubeError, KubeSession


def settings_for(kubeconfig: str, node: str, **pull: Any) -> Settings:
    work = Path(tempfile.mkdtemp(prefix="vkp-bench-"))
    s = load_settings(env={})
    return replace(
        s,
        kube=replace(s.kube, kubeconfig=kubeconfig, qps=0),
        node=replace(s.node, name=node),
        kubelet=replace(s.kubelet, port=0, cert_dir=str(work / "certs")),
        registry=replace(s.registry, db=str(work / "registry.db")),
        pull=replace(s.pull, **pull),
        log_level="WARNING",
    )


@contextlib.asynccontextmanager
async def running_agent(settings: Settings) -> AsyncIterator[Agent]:
    agent = await Agent.create(settings)
    stop = asyncio.Event()
    runner = asyncio.create_task(agent.run(stop))
    try:
        while not agent.nodes or not all(n.heartbeats for n in agent.nodes):
            if runner.done():
                runner.result()
            await asyncio.sleep(0.05)
        yield agent
    finally:
        stop.set()
        await runner


async def namespace(s: KubeSession, name: str) -> None:
    await s.request(
        "POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    while True:
        try:
            sa = await s.request("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default")
            if sa.get("secrets"):
                return
        except KubeError:
            pass
        await asyncio.sleep(0.1)


def pod(name: str, node: str, annotations: dict[str, str] | None = None, image: str = "nginx:1.7.9") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": image, "imagePullPolicy": "IfNotPresent"}]},
    }


async def create_pods(s: KubeSession, ns: str, pods: list[dict[str, Any]], concurrency: int = 16) -> float:
    """Create the Pods; returns the wall seconds it took."""
    queue = list(pods)
    started = time.perf_counter()

    async def worker() -> None:
        while queue:
            body = queue.pop()
            await s.request("POST", f"/api/v1/namespaces/{ns}/pods", body=body)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def wait_running(s: KubeSession, ns: str, count: int, interval: float = 0.25) -> None:
    while True:
        items = (await s.request("GET", f"/api/v1/namespaces/{ns}/pods"))["items"]
        if sum(1 for p in items if p.get("status", {}).get("phase") == "Running") >= count:
            return
        await asyncio.sleep(interval)


async def clear(
    s: KubeSession, ns: str, nodes: Sequence[str] = (), imagecache: str = "", timeout: float = 180.0
) -> None:
    """Remove a run's Pods (at once: no kubelet is left to confirm a graceful deletion), its
    namespace, nodes and ImageCache, and wait until the namespace is gone.

    Left behind, they load the control plane during later runs: the node lifecycle controller
    marks a silent node's Pods not ready (a status write per Pod), later evicts them.
    """
    now = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0}
    await s.request("DELETE", f"/api/v1/namespaces/{ns}/pods", body=now)
    paths = [f"/api/v1/nodes/{node}" for node in nodes]
    if imagecache:
        paths.append(f"/apis/eci.alibabacloud.com/v1/imagecaches/{imagecache}")
    for path in [*paths, f"/api/v1/namespaces/{ns}"]:
        try:
            await s.request("DELETE", path)
        except KubeError as exc:
            if not exc.is_not_found:
                raise
    deadline = time.monotonic() + timeout
    while True:
        try:
            await s.request("GET", f"/api/v1/namespaces/{ns}")
        except KubeError as exc:
            if exc.is_not_found:
                return
            raise
        if time.monotonic() > deadline:
            raise SystemExit(f"namespace {ns} was not deleted within {timeout:.0f} s")
        await asyncio.sleep(0.2)


async def ready_imagecache(s: KubeSession, name: str, images: Sequence[str], timeout: float = 120.0) -> str:
    """Create an ImageCache (a running agent builds it) and return its imageCacheId once it is Ready."""
    cache = {"apiVersion": "eci.alibabacloud.com/v1", "kind": "ImageCache", "metadata": {"name": name},
             "spec": {"images": list(images)}}  # fmt: skip
    await s.request("POST", "/apis/eci.alibabacloud.com/v1/imagecaches", body=cache)
    deadline = time.monotonic() + timeout
    while True:
        found = await s.request("GET", f"/apis/eci.alibabacloud.com/v1/imagecaches/{name}")
        if found.get("status", {}).get("phase") == "Ready":
            return str(found["status"]["imageCacheId"])
        if time.monotonic() > deadline:
            raise SystemExit(f"ImageCache {name} was not Ready within {timeout:.0f} s: {found.get('status')}")
        await asyncio.sleep(0.1)
