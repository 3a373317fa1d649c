"""Run ``vk-provider run`` as a real subprocess against a test cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tests.support.cluster import ROOT, Cluster
from tests.support.wait import wait_for

# Fast heartbeats: the test control plane's node-lifecycle controller uses a 10 s grace period.
IMAGECACHE_LEASE = "vk-provider-imagecaches"  # in kube-system: the ImageCache builder's (caches.leader_lease)
TEST_SETTINGS: dict[str, Any] = {
    "node": {
        "lease_duration_seconds": 10,
        "lease_renew_interval_seconds": 1.0,
        "status_update_interval_seconds": 5,
    },
    "kubelet": {"port": 0, "bind_address": "127.0.0.1"},
    "kube": {"startup_timeout_seconds": 5, "max_backoff_seconds": 1.0},
    # Every agent runs for the ImageCache Lease; after a test kills one, the next leads within 6 s, not 15 s.
    "caches": {"leader_lease_duration_seconds": 6, "leader_renew_interval_seconds": 1.0},
}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class AgentProcess:
    """One agent process; its stderr goes to a file so tests can read the log."""

    def __init__(
        self,
        cluster: Cluster,
        workdir: Path,
        node_name: str = "virtual-kubelet",
        settings: dict[str, Any] | None = None,
        kubeconfig: str | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.node_name = node_name
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_file = workdir / f"{node_name}.yaml"
        self.config_file.write_text(yaml.safe_dump(deep_merge(TEST_SETTINGS, settings or {})))
        self.db = workdir / f"{node_name}.db"
        self.log_file = workdir / f"{node_name}.log"
        self.args = [
            sys.executable,
            "-m",
            "vk_provider",
            "run",
            "--config",
            str(self.config_file),
            "--kubeconfig",
            kubeconfig or cluster.kubeconfig,
            "--node-name",
            node_name,
            "--db",
            str(self.db),
            *(extra_args or []),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        assert self.proc is None or self.proc.poll() is not None, "agent already running"
        self._log = self.log_file.open("ab")
        self.proc = subprocess.Popen(
            self.args,
            cwd=self.workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        return self

    @property
    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def node_ready(self) -> bool:
        node = self.cluster.get_json("node", self.node_name)
        if not node:
            return False
        return any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", []))

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"agent exited early ({self.proc and self.proc.returncode}):\n{self.log[-3000:]}")
            return self.node_ready()

        wait_for(ready, timeout=timeout, what=f"node {self.node_name} Ready")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15, *, release_lease: bool = True) -> int:
        """Stop the agent with ``sig``. A clean stop releases the ImageCache Lease if the agent led;
        after a kill, ``release_lease`` deletes it in the agent's place, so that the next test's
        agent leads at once rather than after the lease duration (a takeover test says False)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if release_lease and self.proc.returncode < 0:
            lease = self.cluster.get_json("lease", "-n", "kube-system", IMAGECACHE_LEASE) or {}
            if str((lease.get("spec") or {}).get("holderIdentity") or "").startswith(f"{self.node_name}_"):
                self.cluster.kubectl("delete", "lease", "-n", "kube-system", IMAGECACHE_LEASE, check=False)
        return int(self.proc.returncode)

    def __enter__(self) -> AgentProcess:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop(signal.SIGKILL)
        elif self.proc is not None:
            self._log.close()


def tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
