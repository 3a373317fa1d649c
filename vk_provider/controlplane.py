"""Runs the project's own control-plane tooling (``hack/controlplane.sh``) for the demo, tests, benches.

Only available from a checkout: the script builds Kubernetes from Debian's source package and
starts etcd, kube-apiserver and kube-controller-manager on loopback (see the script's header).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "hack" / "controlplane.sh"


class ControlPlaneError(Exception):
    """The script failed; the message is one line, ``stderr`` the script's whole error output."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    """``bash hack/controlplane.sh ARGS``; returns its stdout (e.g. the kubeconfig path for ``up``)."""
    if not SCRIPT.is_file():
        raise ControlPlaneError(f"{SCRIPT} not found: the local control plane needs a checkout of vk-provider")
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ControlPlaneError(f"hack/controlplane.sh {' '.join(args)} failed: {last[0]}", proc.stderr)
    return proc.stdout.strip()
