"""Benchmark: API writes per Pod start on the cache-hit path (goal: <= 3 writes of Pod status per Pod).

Builds an ImageCache holding nginx:1.7.9, then starts N Pods that name it explicitly, and counts
what the agent sent while they started: Pod status patches (the figure), and every other write
(other PATCHes, Events) for context; the cache annotations ride on the status patch.
Last line, e.g. ``status writes per Pod start: 2.00 (goal <= 3)``.

Run: ``.venv/bin/python bench/writes_per_pod.py [--pods 100]`` (own control plane, or $KUBECONFIG).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._agent import create_pods, namespace, pod, ready_imagecache, running_agent, settings_for, wait_running
from bench._cluster import control_plane


async def run(kubeconfig: str, count: int) -> None:
    node = "vk-bench-writes"
    settings = settings_for(kubeconfig, node, time_scale=1000.0, jitter=0.0)
    async with running_agent(settings) as agent:
        s = agent.session
        ns = f"bench-writes-{int(time.time())}"
        await namespace(s, ns)
        imc = await ready_imagecache(s, ns, ["nginx:1.7.9"])
        reporter = agent.pods.reporter if agent.pods else None
        assert reporter is not None
        writes_before = reporter.writes
        verbs_before = dict(s.requests_by_verb)
        pods = [pod(f"p{i}", node, {"k8s.aliyun.com/eci-image-snapshot-id": imc}) for i in range(count)]
        await create_pods(s, ns, pods)
        await wait_running(s, ns, count)
        for _ in range(40):  # let trailing writes (events, last statuses) land
            await asyncio.sleep(0.05)
        status_writes = reporter.writes - writes_before
        verbs = {k: v - verbs_before.get(k, 0) for k, v in s.requests_by_verb.items()}
        events = agent.pods.events.posted if agent.pods and hasattr(agent.pods.events, "posted") else 0
        others = verbs.get("PATCH", 0) - status_writes
        print(
            f"pods: {count}; status patches: {status_writes}; other PATCHes: {others}; "
            f"POSTs incl. {count} Pod creations by this script: {verbs.get('POST', 0)}; events posted: {events}"
        )
        print(f"status writes per Pod start: {status_writes / count:.2f} (goal <= 3)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=100)
    args = parser.parse_args()
    with control_plane() as kubeconfig:
        asyncio.run(run(kubeconfig, args.pods))


if __name__ == "__main__":
    main()
