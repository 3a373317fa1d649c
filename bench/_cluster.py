"""A control plane for the benchmarks: $KUBECONFIG if set, else the project's own, started and stopped here."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "hack" / "controlplane.sh"


def _script(*args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})})  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"hack/controlplane.sh {args[0]} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout.strip()


@contextlib.contextmanager
def control_plane(kcm_args: str = "") -> Iterator[str]:
    """Yield a kubeconfig path."""
    if os.environ.get("KUBECONFIG"):
        yield os.environ["KUBECONFIG"]
        return
    _script("build")
    directory = Path(tempfile.mkdtemp(prefix="vkp-bench-"))
    try:
        yield _script("up", str(directory), env={"KTB_KCM_ARGS": kcm_args} if kcm_args else None)
    finally:
        _script("down", str(directory))
        shutil.rmtree(directory, ignore_errors=True)
