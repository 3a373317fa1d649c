"""Benchmark: the seed's Deployment (2 replicas) with the ~386 MB calibration image at time scale 60.

Without a cache its pull simulates ~50 s; at ``pull.time_scale: 60`` both Pods should be Running
about a second of wall time after the Deployment is created. Prints the simulated pull time (from
the Pulled events) and the wall time, last line e.g.
``time scale 60: Running after 1.1 s wall for 49.8 s simulated (ratio 45x; goal: about 1 s)``.

Run: ``.venv/bin/python bench/time_scale.py`` (starts its own control plane, or uses $KUBECONFIG).
"""

from __future__ import annotations

import asyncio
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._cluster import control_plane
from vk_provider.app import Agent
from vk_provider.config import load_settings

IMAGE = "python:3.12"
SCALE = 60.0


async def run(kubeconfig: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="vkp-bench-ts-"))
    settings = load_settings(env={})
    settings = replace(
        settings,
        kube=replace(settings.kube, kubeconfig=kubeconfig, qps=0),
        node=replace(settings.node, name="vk-bench-ts"),
        kubelet=replace(settings.kubelet, port=0, cert_dir=str(work / "certs")),
        registry=replace(settings.registry, db=str(work / "registry.db")),
        pull=replace(settings.pull, time_scale=SCALE),
    )
    agent = await Agent.create(settings)
    stop = asyncio.Event()
    runner = asyncio.create_task(agent.run(stop))
    s = agent.session
    ns = f"bench-ts-{int(time.time())}"
    try:
        while agent.pods is None or agent.node is None or not agent.node.heartbeats:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await s.request(
            "POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
        )
        deployment = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "nginx-deployment", "labels": {"app": "nginx"}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "nginx"}},
                "template": {
                    "metadata": {"labels": {"app": "nginx"}},
                    "spec": {"nodeName": "vk-bench-ts",
                             "containers": [{"name": "app", "image": IMAGE, "imagePullPolicy": "IfNotPresent"}]},
                },
            },
        }  # fmt: skip
        while True:  # the namespace's ServiceAccount token appears shortly after the namespace
            try:
                started = time.perf_counter()
                await s.request("POST", f"/apis/apps/v1/namespaces/{ns}/deployments", body=deployment)
                break
            except Exception:
                await asyncio.sleep(0.2)
        while True:
            pods = (await s.request("GET", f"/api/v1/namespaces/{ns}/pods"))["items"]
            if len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods):
                break
            await asyncio.sleep(0.02)
        wall = time.perf_counter() - started
        await asyncio.sleep(0.5)  # let the Pulled events land
        events = (await s.request("GET", f"/api/v1/namespaces/{ns}/events"))["items"]
        pulls = [float(m.group(1)) for e in events if e["reason"] == "Pulled"
                 and (m := re.search(r"in ([0-9.]+)s", e["message"]))]  # fmt: skip
        simulated = max(pulls) if pulls else float("nan")
        print(f"pulls (simulated s): {', '.join(f'{p:.1f}' for p in pulls)}")
        print(f"time scale {SCALE:g}: Running after {wall:.2f} s wall for {simulated:.1f} s simulated pull "
              f"(ratio {simulated / wall:.0f}x; goal: about 1 s)")  # fmt: skip
    finally:
        stop.set()
        await runner


def main() -> None:
    with control_plane() as kubeconfig:
        asyncio.run(run(kubeconfig))


if __name__ == "__main__":
    main()
