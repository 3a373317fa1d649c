"""``vk-provider demo``: the product's main job end to end on a local control plane.

With no cluster named, it builds (once, cached) and starts the project's own control plane
(``hack/controlplane.sh``), runs the agent on it, shows the virtual Node, and tears everything
down again, leaving no process behind unless ``--keep-cluster`` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

from vk_provider.app import Agent, StartupError
from vk_provider.config import Settings

log = logging.getLogger(__name__)
SCRIPT = Path(__file__).resolve().parents[1] / "hack" / "controlplane.sh"


class DemoError(Exception):
    pass


@dataclass(frozen=True)
class DemoOptions:
    kubeconfig: str = ""  # empty: start the local control plane
    keep_cluster: bool = False
    workdir: str = ""


def _script(*args: str) -> str:
    if not SCRIPT.is_file():
        raise DemoError(f"{SCRIPT} not found: run the demo from a checkout of vk-provider, or name a cluster")
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise DemoError(f"hack/controlplane.sh {args[0]} failed: {tail[0]}")
    return proc.stdout.strip()


@contextlib.asynccontextmanager
async def local_cluster(options: DemoOptions) -> AsyncIterator[str]:
    """Yield a kubeconfig: the named one, or a freshly started local control plane."""
    if options.kubeconfig:
        yield options.kubeconfig
        return
    directory = Path(tempfile.mkdtemp(prefix="vk-provider-demo-"))
    print("building the local control plane if needed (about 4 minutes, once)...", flush=True)
    await asyncio.to_thread(_script, "build")
    print(f"starting etcd, kube-apiserver and kube-controller-manager in {directory} ...", flush=True)
    try:
        kubeconfig = await asyncio.to_thread(_script, "up", str(directory))
        yield kubeconfig
    finally:
        if options.keep_cluster:
            print(f"cluster kept: export KUBECONFIG={directory / 'kubeconfig'}; stop it with "
                  f"bash {SCRIPT} down {directory}")  # fmt: skip
        else:
            await asyncio.to_thread(_script, "down", str(directory))
            shutil.rmtree(directory, ignore_errors=True)
            print("local control plane stopped and removed")


async def run_demo(settings: Settings, options: DemoOptions) -> None:
    workdir = Path(options.workdir or tempfile.mkdtemp(prefix="vk-provider-demo-work-"))
    async with local_cluster(options) as kubeconfig:
        settings = replace(
            settings,
            kube=replace(settings.kube, kubeconfig=kubeconfig),
            kubelet=replace(settings.kubelet, port=0, cert_dir=str(workdir / "certs")),
        )
        agent = await Agent.create(settings)
        stop = asyncio.Event()
        runner = asyncio.create_task(agent.run(stop), name="demo-agent")
        try:
            node = await _wait_node_ready(agent, runner)
            _print_node(node)
        finally:
            stop.set()
            await runner


async def _wait_node_ready(agent: Agent, runner: asyncio.Task[None]) -> dict[str, object]:
    name = agent.settings.node.name
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while loop.time() < deadline:
        if runner.done():
            runner.result()
            raise DemoError("the agent stopped before its node was Ready")
        try:
            node = await agent.session.request("GET", f"/api/v1/nodes/{name}")
        except Exception:
            node = {}
        conditions = node.get("status", {}).get("conditions", []) if node else []
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            return node
        await asyncio.sleep(0.2)
    raise DemoError(f"node {name} did not become Ready within 60 s")


def _print_node(node: dict[str, object]) -> None:
    meta = node["metadata"]
    status = node["status"]
    assert isinstance(meta, dict)
    assert isinstance(status, dict)
    print(f"\nnode {meta['name']} is Ready")
    print("  labels: " + ", ".join(f"{k}={v}" for k, v in sorted(meta.get("labels", {}).items())))
    spec = node.get("spec") or {}
    assert isinstance(spec, dict)
    for taint in spec.get("taints", []):
        print(f"  taint:  {taint['key']}={taint.get('value', '')}:{taint['effect']}")
    print("  capacity: " + ", ".join(f"{k}={v}" for k, v in sorted(status["capacity"].items())))
    sys.stdout.flush()


def main(settings: Settings, options: DemoOptions) -> None:
    try:
        asyncio.run(run_demo(settings, options))
    except DemoError as exc:
        raise StartupError(str(exc)) from None
