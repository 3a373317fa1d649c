"""Benchmark: the agent's resident memory with 10,000 Running Pods tracked (goal: <= 250 MB).

Starts the agent as its own process (so its RSS is its own), creates N Pods bound to its node
(no cache, zero simulated delays), waits until the API server has them all Running, and reads the
agent's VmRSS from /proc. Last line, e.g. ``agent RSS with 10000 Running Pods: 180 MB (goal <= 250 MB)``.

Run: ``.venv/bin/python bench/memory.py [--pods 10000]`` (own control plane, or $KUBECONFIG).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._agent import create_pods, namespace, pod
from bench._cluster import control_plane
from vk_provider.kube.session import KubeError, KubeSession

NODE = "vk-bench-mem"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def count_running(s: KubeSession, ns: str) -> int:
    running, token = 0, ""
    while True:
        query = {"limit": "2000", "fieldSelector": "status.phase=Running"}
        if token:
            query["continue"] = token
        page = await s.request("GET", f"/api/v1/namespaces/{ns}/pods", query=query)
        running += len(page.get("items", []))
        token = page.get("metadata", {}).get("continue", "")
        if not token:
            return running


async def node_ready(s: KubeSession, agent: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise SystemExit("the agent exited before its Node was Ready")
        try:
            node = await s.request("GET", f"/api/v1/nodes/{NODE}")
            conditions = (node.get("status") or {}).get("conditions") or []
            if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
                return
        except KubeError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit(f"Node {NODE} not Ready within 120 s")


async def run(kubeconfig: str, count: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="vkp-bench-mem-"))
    settings = {
        "node": {"name": NODE, "pods": count + 10},
        "kube": {"qps": 0},
        "kubelet": {"port": 0, "cert_dir": str(work / "certs")},
        "pull": {"time_scale": 1e9, "jitter": 0, "container_start_seconds": 0},
        "pods": {"pod_cidr": "10.128.0.0/14"},
        "log_level": "WARNING",
    }
    (work / "agent.yaml").write_text(yaml.safe_dump(settings))
    log = (work / "agent.log").open("w")
    agent = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything is measured
        [sys.executable, "-m", "vk_provider", "run", "--config", str(work / "agent.yaml"),
         "--kubeconfig", kubeconfig, "--db", str(work / "registry.db")],
        stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    s = await KubeSession.connect(kubeconfig)
    try:
        ns = f"bench-mem-{int(time.time())}"
        await namespace(s, ns)
        await node_ready(s, agent)  # the agent has imported and started everything: a fair idle figure
        idle = rss_mb(agent.pid)
        created = await create_pods(s, ns, [pod(f"p{i}", NODE) for i in range(count)])
        print(f"created {count} Pods in {created:.0f} s; agent RSS with no Pods: {idle:.0f} MB", flush=True)
        deadline = time.monotonic() + 1800
        while (running := await count_running(s, ns)) < count:
            if agent.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"only {running} of {count} Pods Running; see {work / 'agent.log'}")
            await asyncio.sleep(2)
        await asyncio.sleep(5)  # let the last Events drain
        full = rss_mb(agent.pid)
        print(f"per Pod: {(full - idle) * 1024 / count:.1f} KB above idle", flush=True)
        print(f"agent RSS with {count} Running Pods: {full:.0f} MB (goal <= 250 MB)")
    finally:
        await s.close()
        agent.terminate()
        agent.wait(timeout=30)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=10_000)
    args = parser.parse_args()
    with control_plane() as kubeconfig:
        asyncio.run(run(kubeconfig, args.pods))


if __name__ == "__main__":
    main()
