"""A real Kubernetes control plane for the integration tests, and kubectl against it.

By default the project's own ``hack/controlplane.sh`` builds (once, cached) and starts etcd,
kube-apiserver and kube-controller-manager on loopback. Set ``VK_TEST_KUBECONFIG`` to run the
integration tests against another cluster (e.g. kind) instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vk_provider import controlplane

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Cluster:
    kubeconfig: str
    directory: Path | None = None  # None: an external cluster we did not start
    env: dict[str, str] = field(default_factory=dict)

    @property
    def managed(self) -> bool:
        return self.directory is not None

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> str:
        proc = self.kubectl_raw(*args, input=input, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def kubectl_raw(
        self, *args: str, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.kubectl_path, *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **self.env, "KUBECONFIG": self.kubeconfig},
            check=False,
        )

    def get_json(self, *args: str) -> Any:
        proc = self.kubectl_raw("get", *args, "-o", "json")
        if proc.returncode != 0:
            if "NotFound" in proc.stderr or "not found" in proc.stderr:
                return None
            raise AssertionError(f"kubectl get {' '.join(args)}: {proc.stderr.strip()}")
        return json.loads(proc.stdout)

    def apply(self, manifest: str) -> str:
        return self.kubectl("apply", "-f", "-", input=manifest)

    @property
    def kubectl_path(self) -> str:
        path = self.env.get("PATH", os.environ.get("PATH", ""))
        found = shutil.which("kubectl", path=path)
        if not found:
            raise AssertionError("kubectl not found (build the control plane with `make controlplane`)")
        return found

    def down(self) -> None:
        if self.directory is not None:
            _script("down", str(self.directory))

    def up(self) -> None:
        if self.directory is not None:
            _script("up", str(self.directory))


def _script(*args: str, extra_env: dict[str, str] | None = None) -> str:
    try:
        return controlplane.run(*args, env=extra_env)
    except controlplane.ControlPlaneError as exc:
        raise RuntimeError(f"{exc}\n{exc.stderr[-3000:]}") from None


def start_control_plane(directory: Path, kcm_args: str = "") -> Cluster:
    """Build (if not cached) and start a control plane in ``directory``."""
    _script("build")
    extra = {"KTB_KCM_ARGS": kcm_args} if kcm_args else {}
    kubeconfig = _script("up", str(directory), extra_env=extra)
    env: dict[str, str] = {}
    for line in (directory / "env").read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            env[key] = value.replace("$PATH", os.environ.get("PATH", ""))
    return Cluster(kubeconfig=kubeconfig, directory=directory, env=env)


def external_cluster() -> Cluster | None:
    kubeconfig = os.environ.get("VK_TEST_KUBECONFIG")
    return Cluster(kubeconfig=kubeconfig) if kubeconfig else None
