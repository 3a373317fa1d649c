"""``vk-provider demo``: the product's main job end to end, on a local control plane.

With no cluster named, it builds (once, cached) and starts the project's own control plane
(``hack/controlplane.sh``), runs the agent on it, and replays the seed document's examples:

1. a baseline Pod without any cache annotation (every image pulled);
2. the seed's auto-match Pod: no cache exists, so it misses, and an automatic ImageCache is made
   from its images while it pulls;
3. once that cache is Ready, the seed's auto-match Deployment (2 replicas) hits it;
4. the seed's explicit Pod, naming the cache's ID, hits it too.

Then it prints the comparison report (the same as ``vk-provider report``) and the chart's path, and
tears everything down, leaving no process behind unless ``--keep-cluster`` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vk_provider import controlplane
from vk_provider.app import Agent, StartupError
from vk_provider.config import Settings
from vk_provider.controlplane import SCRIPT, ControlPlaneError
from vk_provider.kube.session import KubeError

log = logging.getLogger(__name__)
NAMESPACE = "vk-provider-demo"
IMAGE = "nginx:1.7.9"
CACHES = "/apis/eci.alibabacloud.com/v1/imagecaches"


class DemoError(Exception):
    pass


@dataclass(frozen=True)
class DemoOptions:
    kubeconfig: str = ""  # empty: start the local control plane
    keep_cluster: bool = False
    workdir: str = ""
    time_scale: float = 10.0


def _script(*args: str) -> str:
    try:
        return controlplane.run(*args)
    except ControlPlaneError as exc:
        raise DemoError(f"{exc}; or name a cluster with --kubeconfig") from None


def say(text: str) -> None:
    print(text, flush=True)


@contextlib.asynccontextmanager
async def local_cluster(options: DemoOptions) -> AsyncIterator[str]:
    """Yield a kubeconfig: the named one, or a freshly started local control plane."""
    if options.kubeconfig:
        yield options.kubeconfig
        return
    directory = Path(tempfile.mkdtemp(prefix="vk-provider-demo-"))
    say("building the local control plane if needed (about 4 minutes, once)...")
    await asyncio.to_thread(_script, "build")
    say(f"starting etcd, kube-apiserver and kube-controller-manager in {directory} ...")
    try:
        kubeconfig = await asyncio.to_thread(_script, "up", str(directory))
        yield kubeconfig
    finally:
        if options.keep_cluster:
            say(f"cluster kept: export KUBECONFIG={directory / 'kubeconfig'}; stop it with "
                f"bash {SCRIPT} down {directory}")  # fmt: skip
        else:
            await asyncio.to_thread(_script, "down", str(directory))
            shutil.rmtree(directory, ignore_errors=True)
            say("local control plane stopped and removed")


async def run_demo(settings: Settings, options: DemoOptions) -> None:
    workdir = Path(options.workdir or tempfile.mkdtemp(prefix="vk-provider-demo-work-"))
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "registry.db"
    async with local_cluster(options) as kubeconfig:
        settings = replace(
            settings,
            kube=replace(settings.kube, kubeconfig=kubeconfig),
            kubelet=replace(settings.kubelet, port=0, cert_dir=str(workdir / "certs")),
            registry=replace(settings.registry, db=str(db)),
            pull=replace(settings.pull, time_scale=options.time_scale),
        )
        agent = await Agent.create(settings)
        stop = asyncio.Event()
        runner = asyncio.create_task(agent.run(stop), name="demo-agent")
        try:
            await Scenario(agent, runner, settings.node.name).play()
        finally:
            stop.set()
            await runner
    await _print_report(db)


class Scenario:
    def __init__(self, agent: Agent, runner: asyncio.Task[None], node: str) -> None:
        self.agent = agent
        self.runner = runner
        self.node = node
        self.s = agent.session

    async def wait(self, what: str, check: Callable[[], Any], timeout: float = 120) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.runner.done():
                self.runner.result()
                raise DemoError("the agent stopped unexpectedly")
            try:
                found = await check()
            except Exception:
                found = None
            if found:
                return found
            if loop.time() > deadline:
                raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")
            await asyncio.sleep(0.2)

    async def play(self) -> None:
        node = await self.wait(f"node {self.node} Ready", self._node_ready)
        say(f"\nnode {self.node} is Ready (taint {node['spec']['taints'][0]['key']}="
            f"{node['spec']['taints'][0].get('value', '')}:NoSchedule)")  # fmt: skip
        await self._namespace()
        say(f"\n1. baseline Pod without a cache: pulls {IMAGE}")
        await self._create_pod("nginx-baseline", {})
        await self.wait("nginx-baseline Running", lambda: self._running(["nginx-baseline"]))
        say("2. the seed's auto-match Pod: no cache exists yet -> ImageCacheMissed, automatic cache created")
        await self._create_pod("nginx-auto-match", {"k8s.aliyun.com/eci-image-cache": "true"})
        await self.wait("nginx-auto-match Running", lambda: self._running(["nginx-auto-match"]))
        cache = await self.wait("the automatic ImageCache to be Ready", self._ready_cache, timeout=180)
        imc_id = cache["status"]["imageCacheId"]
        say(f"   ImageCache {cache['metadata']['name']} is Ready: {imc_id}")
        say("3. the seed's auto-match Deployment (2 replicas): hits the cache")
        await self._create_deployment()
        names = await self.wait("2 Deployment Pods Running", self._deployment_running)
        say(f"4. the seed's explicit Pod naming {imc_id}: hits it")
        await self._create_pod("nginx-imagecache-id", {"k8s.aliyun.com/eci-image-snapshot-id": imc_id})
        await self.wait("nginx-imagecache-id Running", lambda: self._running(["nginx-imagecache-id"]))
        for name in ["nginx-baseline", "nginx-auto-match", *names, "nginx-imagecache-id"]:
            pod = await self.s.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}")
            matched = pod["metadata"].get("annotations", {}).get("k8s.aliyun.com/eci-matched-image-cache", "-")
            say(f"   {name:<34} {pod['status']['phase']:<8} matched cache: {matched}")
        # Let the last start be recorded before the agent stops.
        await self.wait("every start recorded", self._all_recorded, timeout=30)

    async def _node_ready(self) -> Any:
        node = await self.s.request("GET", f"/api/v1/nodes/{self.node}")
        conditions = node.get("status", {}).get("conditions", [])
        return node if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) else None

    async def _namespace(self) -> None:
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        with contextlib.suppress(Exception):
            await self.s.request("POST", "/api/v1/namespaces", body=body)
        await self.wait(
            "the namespace's default ServiceAccount",
            lambda: self.s.request("GET", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default"),
        )

    def _pod_spec(self) -> dict[str, Any]:
        return {
            "nodeName": self.node,
            "containers": [
                {
                    "name": "nginx",
                    "image": IMAGE,
                    "imagePullPolicy": "IfNotPresent",
                    "resources": {
                        "limits": {"cpu": "300m", "memory": "200Mi"},
                        "requests": {"cpu": "200m", "memory": "100Mi"},
                    },
                }
            ],
        }

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        """Create an object; retry while a new namespace is not ready for it yet (its ServiceAccount token)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            try:
                await self.s.request("POST", path, body=body)
                return
            except KubeError as exc:
                if exc.status not in (500, 503, 0) or loop.time() > deadline:
                    raise DemoError(f"cannot create {body['kind']} {body['metadata']['name']}: {exc.message}") from None
            await asyncio.sleep(0.5)

    async def _create_pod(self, name: str, annotations: dict[str, str]) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"demo": name}, "annotations": annotations},
            "spec": self._pod_spec(),
        }
        await self._post(f"/api/v1/namespaces/{NAMESPACE}/pods", body)

    async def _create_deployment(self) -> None:
        body = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "nginx-deployment", "labels": {"app": "nginx"}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "nginx"}},
                "template": {
                    "metadata": {"labels": {"app": "nginx"}, "annotations": {"k8s.aliyun.com/eci-image-cache": "true"}},
                    "spec": self._pod_spec(),
                },
            },
        }
        await self._post(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments", body)

    async def _running(self, names: list[str]) -> bool:
        for name in names:
            pod = await self.s.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}")
            if pod.get("status", {}).get("phase") != "Running":
                return False
        return True

    async def _deployment_running(self) -> list[str] | None:
        pods = await self.s.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods", query={"labelSelector": "app=nginx"})
        items = pods.get("items", [])
        running = [p["metadata"]["name"] for p in items if p.get("status", {}).get("phase") == "Running"]
        return running if len(running) == 2 else None

    async def _ready_cache(self) -> Any:
        caches = await self.s.request("GET", CACHES)
        for cache in caches.get("items", []):
            if (
                cache["metadata"]["name"].startswith("auto-create-for-")
                and cache.get("status", {}).get("phase") == "Ready"
            ):
                return cache
        return None

    async def _all_recorded(self) -> bool:
        registry = self.agent.registry
        if registry is None:
            return True
        starts = await registry.list_pod_starts(namespace=NAMESPACE)
        return len(starts) >= 5


async def _print_report(db: Path) -> None:
    from vk_provider.report import build_comparison, default_chart_path, load_records, render_text, write_chart

    records = await load_records(str(db), None)
    comparison = build_comparison(records)
    chart = default_chart_path(str(db))
    write_chart(comparison, chart)
    say("")
    say(render_text(comparison).rstrip())
    say(f"chart: {chart}")
    say(f"database: {db}   (try: sqlite3 {db} 'select * from pod_start_by_outcome')")
    sys.stdout.flush()


def main(settings: Settings, options: DemoOptions) -> None:
    try:
        asyncio.run(run_demo(settings, options))
    except (DemoError, KubeError) as exc:
        raise StartupError(str(exc)) from None
