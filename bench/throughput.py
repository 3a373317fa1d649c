"""Benchmark: Pods to Running through the agent vs. the API server's own limit (goal: ratio <= 1.25).

In one run, against one API server:
- the goal's reference: a minimal script patches the status of N Pending Pods to Running, 16 at a
  time, with a minimal status (phase and Ready) through kubernetes_asyncio's generated API;
- the same minimal status sent through the agent's own request path (KubeSession), and exactly
  what the agent writes (the status a kubelet writes: conditions, container statuses, Pod IPs,
  start time; the ECI annotations; the uid precondition) sent through that same path: the API
  server's limit for the agent's writes;
- agent: N Pods bound to a virtual node with a Ready ImageCache named explicitly (a cache hit)
  and zero simulated delays; timed from the agent taking the first of them (from its list) to the
  last Running status accepted by the API server.
The ratio then splits into three factors: agent / kubelet status (what the agent costs beyond its
writes: its Pod lifecycle, its watch, its Node), kubelet / minimal status (the bigger object for the
API server), and minimal status through the agent's path / through the generated client (the
client library's own CPU, which shares the machine with the API server).
It also prints the CPU seconds each process spent in each timed window (the local control plane's
etcd, kube-apiserver and controllers, read from /proc, and this process: the client, or the agent),
medians over the rounds: on a machine the API server keeps busy, the seconds follow that CPU. The
meter samples every 20 ms, so each window is read up to 20 ms wide at either end: a run of a few
Pods can show more than 100 % of the cores; a 1,000-Pod window (over a second) is off by a few %.
Last line, e.g. ``throughput ratio: 1.9 (agent 12.3 s / minimal baseline 6.4 s for 1000 Pods; goal <= 1.25)``.

Each round runs the four in turn; the figures are medians over ``--rounds`` (default 5), since
one run on a 2-core machine shared with the API server varies by +-15 %.
Run: ``.venv/bin/python bench/throughput.py [--pods 1000] [--rounds 5]`` (own control plane, or $KUBECONFIG).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from bench._agent import clear, create_pods, namespace, pod, ready_imagecache, running_agent, settings_for
from bench._cluster import CpuMeter, control_plane, describe_cpu
from vk_provider.config import Settings
from vk_provider.domain import lifecycle as lc
from vk_provider.domain.lifecycle import Phase
from vk_provider.kube.pods import conditions_merged
from vk_provider.kube.session import MERGE_PATCH, STRATEGIC_MERGE_PATCH, KubeError, KubeSession

MINIMAL = {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}

# Where the time went: seconds, and CPU seconds per process (control plane and this one) in that window.
Timed = tuple[float, dict[str, float]]


def kubelet_like() -> dict[str, Any]:
    """What the agent writes for these Pods: the Running status a kubelet writes, and the ECI
    annotations (instance id, matched cache); each Pod's uid is added as the agent's precondition."""
    now = datetime.now(UTC)
    state = lc.accepted(restart_policy="Always", init_containers=[], containers=[("c", "nginx:1.7.9")],
                        host_ip="10.0.0.1", pod_ip="10.234.0.9", now=now)  # fmt: skip
    state = lc.became_ready(lc.started(state, "c", "uid", "docker.io/library/nginx@sha256:" + "0" * 64, now), "c", now)
    return {
        "metadata": {
            "annotations": {
                "k8s.aliyun.com/eci-instance-id": "eci-" + "0" * 20,
                "k8s.aliyun.com/eci-matched-image-cache": "imc-" + "0" * 20,
            }
        },
        "status": lc.render_status(state),
    }


# The Pods are created by a third party, as a ReplicaSet controller would: the status writer (the
# baseline's client or the agent) is then a second field manager of each Pod, as a kubelet is.
CREATOR = "vk-bench-creator"


async def baseline(kubeconfig: str, meter: CpuMeter, count: int, body: dict[str, Any], *, lean: bool = False) -> Timed:
    """Seconds to patch ``count`` Pending Pods' status to ``body``, 16 at a time.

    With kubernetes_asyncio's generated API (the goal's reference), or with ``lean`` through the
    agent's own request path (KubeSession), to show how much of the gap is the client library.
    """
    session = await KubeSession.connect(kubeconfig, user_agent=CREATOR)
    try:
        ns = f"bench-base-{time.time_ns()}"
        await namespace(session, ns)
        try:
            # The Pods' node must exist, or the Pod garbage collector deletes them.
            try:
                nobody = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "vk-bench-nobody"}}
                await session.request("POST", "/api/v1/nodes", body=nobody)
            except KubeError as exc:
                if not exc.is_conflict:  # already there from an earlier run against the same cluster
                    raise
            await create_pods(session, ns, [pod(f"p{i}", "vk-bench-nobody") for i in range(count)])
            bodies = await _bodies(session, ns, body)
            if lean:
                return await _lean_patches(kubeconfig, meter, ns, count, bodies)
            return await _generated_patches(kubeconfig, meter, ns, count, bodies)
        finally:
            await clear(session, ns)
    finally:
        await session.close()


async def _bodies(session: KubeSession, ns: str, body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The body to send to each Pod: with its uid as a precondition when the body has metadata (as the agent's)."""
    items = (await session.request("GET", f"/api/v1/namespaces/{ns}/pods"))["items"]
    if "metadata" not in body:
        return {p["metadata"]["name"]: body for p in items}
    return {
        p["metadata"]["name"]: {**body, "metadata": {**body["metadata"], "uid": p["metadata"]["uid"]}} for p in items
    }


async def _sixteen_at_a_time(meter: CpuMeter, count: int, patch: Callable[[str], Awaitable[object]]) -> Timed:
    """Seconds (and CPU) to call ``patch`` for Pods p0..p<count-1>, 16 calls in flight at a time."""
    names = [f"p{i}" for i in range(count)]
    started = time.monotonic()

    async def worker() -> None:
        while names:
            await patch(names.pop())

    await asyncio.gather(*(worker() for _ in range(16)))
    ended = time.monotonic()
    return ended - started, await _cpu(meter, started, ended)


async def _cpu(meter: CpuMeter, start: float, end: float) -> dict[str, float]:
    await asyncio.sleep(2 * meter.interval)  # the meter's next samples, past the window's end
    return meter.window(start, end)


async def _generated_patches(
    kubeconfig: str, meter: CpuMeter, ns: str, count: int, bodies: dict[str, dict[str, Any]]
) -> Timed:
    cfg = k8s_client.Configuration()
    await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    async with k8s_client.ApiClient(cfg) as api:
        core = k8s_client.CoreV1Api(api)

        async def patch(name: str) -> object:
            # _content_type: how the generated API takes a merge patch (not in its typed signature)
            return await core.patch_namespaced_pod_status(  # type: ignore[call-arg]
                name, ns, bodies[name], _content_type="application/merge-patch+json", _preload_content=False
            )

        elapsed = await _sixteen_at_a_time(meter, count, patch)
        items = (await core.list_namespaced_pod(ns)).items
        assert sum(1 for p in items if p.status.phase == "Running") == count, "baseline patches did not all land"
        return elapsed


async def _lean_patches(
    kubeconfig: str, meter: CpuMeter, ns: str, count: int, bodies: dict[str, dict[str, Any]]
) -> Timed:
    async with await KubeSession.connect(kubeconfig) as session:

        async def patch(name: str) -> object:
            path = f"/api/v1/namespaces/{ns}/pods/{name}/status"
            body = bodies[name]
            if "metadata" in body:  # the agent's write: sent as the agent sends it (kube.pods.PodClient)
                body = {**body, "status": conditions_merged(body["status"])}
                return await session.request("PATCH", path, body=body, content_type=STRATEGIC_MERGE_PATCH,
                                             want_body=False)  # fmt: skip
            return await session.request("PATCH", path, body=body, content_type=MERGE_PATCH, want_body=False)

        elapsed = await _sixteen_at_a_time(meter, count, patch)
        items = (await session.request("GET", f"/api/v1/namespaces/{ns}/pods"))["items"]
        assert sum(1 for p in items if p["status"]["phase"] == "Running") == count, "baseline patches did not all land"
        return elapsed


async def agent_run(kubeconfig: str, meter: CpuMeter, count: int) -> Timed:
    stamp = time.time_ns()
    node = f"vk-bench-tp-{stamp}"  # a fresh node: no Pods left from an earlier run count against it
    builder = "vk-bench-builder"
    settings = settings_for(
        kubeconfig, node, time_scale=1e9, jitter=0.0, container_start_seconds=0.0, snapshot_attach_seconds=0.0
    )
    settings = replace(settings, pods=replace(settings.pods, status_writers=16))
    ns = f"bench-tp-{stamp}"
    session = await KubeSession.connect(kubeconfig, user_agent=CREATOR)
    try:
        await namespace(session, ns)
        try:
            # The CRD may not exist before the first agent start: let the agent install it, build the cache.
            async with running_agent(replace(settings, node=replace(settings.node, name=builder))):
                imc = await ready_imagecache(session, ns, ["nginx:1.7.9"])
            annotations = {"k8s.aliyun.com/eci-image-snapshot-id": imc}
            await create_pods(session, ns, [pod(f"p{i}", node, annotations) for i in range(count)])
            return await _time_agent(settings, meter, ns, count)
        finally:
            await clear(session, ns, nodes=(node, builder), imagecache=ns)
    finally:
        await session.close()


async def _time_agent(settings: Settings, meter: CpuMeter, ns: str, count: int) -> Timed:
    cpu = time.process_time()
    async with running_agent(settings) as agent:
        controller = agent.pods
        assert controller is not None
        await controller.synced.wait()
        connections = agent.session.connections_made
        # Timed from the moment the agent took the first Pod (from its list), not from when this
        # script gets control back: by then the agent has already done part of the work.
        assert controller.first_taken is not None
        started = controller.first_taken
        clock = asyncio.get_running_loop().time
        while True:
            await asyncio.sleep(0.01)
            # Cheap checks first: this loop shares the agent's process and CPU.
            if clock() - started > 300:
                raise SystemExit(f"only {controller.started_total} of {count} Pods started in 300 s")
            if controller.started_total < count or controller.reporter.busy():
                continue
            workers = [w for w in controller.workers.values() if w.facts.namespace == ns]
            if any(w.state is not None and w.state.terminal for w in workers):
                raise SystemExit("a Pod failed; the figure would be meaningless")
            if (
                len(workers) == count
                and all(w.state is not None and w.state.phase is Phase.RUNNING for w in workers)
                and controller.reporter.busy() == 0
            ):
                ended = clock()
                events = agent.events
                print(
                    f"agent: {controller.reporter.writes / count:.2f} status writes per Pod; "
                    f"{events.posted if events else 0} Events posted by then (they give way to status); "
                    f"{agent.session.connections_made - connections} connections opened after it listed its Pods "
                    f"(the rest when it started); "
                    f"agent process CPU {time.process_time() - cpu:.2f} s from its start",
                    flush=True,
                )
                return ended - started, await _cpu(meter, started, ended)


async def run(kubeconfig: str, count: int, rounds: int) -> None:
    kinds = ("minimal", "lean", "kubelet", "agent")
    timed: dict[str, list[Timed]] = {kind: [] for kind in kinds}
    with CpuMeter(kubeconfig) as meter:
        for r in range(1, rounds + 1):
            # Each run removes its Pods, namespace and node before the next one starts.
            timed["minimal"].append(await baseline(kubeconfig, meter, count, MINIMAL))
            timed["lean"].append(await baseline(kubeconfig, meter, count, MINIMAL, lean=True))
            timed["kubelet"].append(await baseline(kubeconfig, meter, count, kubelet_like(), lean=True))
            timed["agent"].append(await agent_run(kubeconfig, meter, count))
            last = {kind: timed[kind][-1][0] for kind in kinds}
            print(
                f"round {r}: minimal status {last['minimal']:.2f} s (through the agent's request path "
                f"{last['lean']:.2f} s), kubelet status through the agent's request path {last['kubelet']:.2f} s, "
                f"agent {last['agent']:.2f} s ({count / last['agent']:.0f} Pods/s); "
                f"this round's ratio {last['agent'] / last['minimal']:.2f}",
                flush=True,
            )
    seconds = {kind: median(s for s, _ in timed[kind]) for kind in kinds}
    base, thin, full, mine = (seconds[kind] for kind in kinds)
    print(f"medians of {rounds} rounds: minimal status {base:.2f} s ({count / base:.0f}/s), through the agent's "
          f"request path {thin:.2f} s; kubelet status through that path {full:.2f} s; agent {mine:.2f} s",
          flush=True)  # fmt: skip
    print(f"factors: agent / kubelet status {mine / full:.2f} (the agent beyond its writes) x kubelet / minimal "
          f"status {full / thin:.2f} (the bigger object) x agent's request path / generated client "
          f"{thin / base:.2f} (the client library)", flush=True)  # fmt: skip
    # On a machine the API server keeps busy, the seconds follow the CPU that everything spent.
    cpu = {kind: _median_cpu(timed[kind]) for kind in kinds}
    labels = {"minimal": "minimal status (generated client)", "lean": "minimal status (agent's request path)",
              "kubelet": "kubelet status (agent's request path)", "agent": "agent"}  # fmt: skip
    for kind in kinds:
        used = describe_cpu(cpu[kind], seconds[kind], meter.cores)
        print(f"CPU in the timed window, {labels[kind]}: {used}", flush=True)
    if cpu["minimal"] and cpu["agent"]:
        print(f"CPU ratio agent / minimal: {sum(cpu['agent'].values()) / sum(cpu['minimal'].values()):.2f}", flush=True)
    # The figure is the ratio of the medians; the rounds' own ratios show how far one run can stray.
    paired = sorted(a / m for (a, _), (m, _) in zip(timed["agent"], timed["minimal"], strict=True))
    print(f"the rounds' own ratios (agent / minimal of the same round): {', '.join(f'{r:.2f}' for r in paired)}; "
          f"median {median(paired):.2f}", flush=True)  # fmt: skip
    print(
        f"throughput ratio: {mine / base:.2f} "
        f"(agent {mine:.2f} s / minimal baseline {base:.2f} s for {count} Pods, medians of {rounds}; goal <= 1.25)"
    )


def _median_cpu(runs: list[Timed]) -> dict[str, float]:
    """Per process, the median of its CPU seconds over the runs."""
    names = [name for name in runs[0][1] if all(name in used for _, used in runs)] if runs else []
    return {name: median(used[name] for _, used in runs) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5, help="the figure is the ratio of the medians")
    args = parser.parse_args()
    with control_plane() as kubeconfig:
        asyncio.run(run(kubeconfig, args.pods, args.rounds))


if __name__ == "__main__":
    main()
