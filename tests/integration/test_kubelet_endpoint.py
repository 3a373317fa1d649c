"""kubectl through the API server to the agent's kubelet endpoint: `kubectl logs` options, and the
clear refusal of exec, attach and port-forward (the containers are simulated)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.support.cluster import Cluster
from tests.support.fixtures import pod_manifest, start_agent
from tests.support.wait import wait_for

FAST = {"pull": {"time_scale": 20, "jitter": 0}}


def failure(cluster: Cluster, *args: str) -> str:
    """kubectl's stderr for a command that must fail."""
    done = cluster.kubectl_raw(*args, timeout=30)
    assert done.returncode != 0, done.stdout
    return done.stderr.strip()


def test_kubectl_logs_options_and_exec_refused(cluster: Cluster, workdir: Path, namespace: str) -> None:
    with start_agent(cluster, workdir, FAST) as agent:
        # Ready 1.5 s (30 simulated s) after it starts: the log spans two wall-clock seconds at least.
        pod = pod_manifest("web", agent.node_name, annotations={"vk-provider.io/ready-after-seconds": "30"})
        cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(pod))
        logs = ("logs", "-n", namespace, "web")
        wait_for(lambda: "container is ready" in cluster.kubectl_raw(*logs).stdout, timeout=30, what="ready")
        whole = cluster.kubectl(*logs)
        stamped = cluster.kubectl(*logs, "--timestamps").splitlines()

        # --limit-bytes: the first bytes only; with --follow the stream ends there, the container running.
        assert cluster.kubectl(*logs, "--limit-bytes=20") == whole[:20]
        assert cluster.kubectl(*logs, "--limit-bytes=20", "--follow", timeout=15) == whole[:20]
        # --since-time: the lines at or after it (kubectl sends whole seconds: the last line's second).
        second = stamped[-1][:19]  # 2026-01-02T15:04:05
        kept = [line.split(" ", 1)[1] + "\n" for line in stamped if line[:19] >= second]
        assert 0 < len(kept) < len(stamped)
        assert cluster.kubectl(*logs, f"--since-time={second}Z") == "".join(kept)
        future = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert cluster.kubectl(*logs, f"--since-time={future}") == ""
        # --since: counted back from now; the start-up lines fall out of a 1 s window once that old.
        assert cluster.kubectl(*logs, "--since=1h") == whole
        wait_for(lambda: cluster.kubectl(*logs, "--since=1s") == "", timeout=15, what="no line in the last second")
        assert cluster.kubectl(*logs, "--since=1h", "--tail=1", "--limit-bytes=5") == whole.splitlines()[-1][:5]

        # exec, attach, port-forward: a message saying why, not an empty "Error from server: ".
        refusal = "vk-provider simulates containers: {} is not supported"
        assert failure(cluster, "exec", "-n", namespace, "web", "--", "ls") == (
            "Error from server (BadRequest): " + refusal.format("exec")
        )
        assert ("Error from server (BadRequest): " + refusal.format("attach")) in failure(
            cluster, "attach", "-n", namespace, "web"
        )
        assert failure(cluster, "port-forward", "-n", namespace, "web", ":80") == (
            "error: error upgrading connection: " + refusal.format("port-forward")
        )
        assert agent.stop() == 0
