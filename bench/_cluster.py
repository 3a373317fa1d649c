"""A control plane for the benchmarks: $KUBECONFIG if set, else the project's own, started and stopped here."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vk_provider import controlplane


def _script(*args: str, env: dict[str, str] | None = None) -> str:
    try:
        return controlplane.run(*args, env=env)
    except controlplane.ControlPlaneError as exc:
        raise SystemExit(f"{exc}\n{exc.stderr[-500:]}") from None


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
