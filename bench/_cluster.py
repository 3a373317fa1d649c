"""A control plane for the benchmarks: $KUBECONFIG if set, else the project's own, started and stopped here."""

from __future__ import annotations

import bisect
import contextlib
import os
import shutil
import tempfile
import threading
import time
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


class CpuMeter:
    """CPU seconds used by the local control plane's processes and by this one, sampled every
    20 ms in a thread, so that a benchmark can tell what the machine spent in a timed window.

    The control plane's processes are read from the ``pids`` file beside the kubeconfig that
    ``hack/controlplane.sh up`` writes; with another cluster ($KUBECONFIG) only this process is
    measured. Windows are in ``time.monotonic()`` seconds (the event loop's clock).
    """

    def __init__(self, kubeconfig: str, interval: float = 0.02) -> None:
        self.processes: dict[str, int] = {}
        pids = Path(kubeconfig).parent / "pids"
        if pids.is_file():
            for line in pids.read_text().splitlines():
                name, _, pid = line.partition(" ")
                if pid.strip().isdigit():
                    self.processes[name] = int(pid)
        self.processes["this process"] = os.getpid()
        self.cores = os.cpu_count() or 1
        self._tick = os.sysconf("SC_CLK_TCK")
        self.interval = interval
        self._times: list[float] = []
        self._samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)

    def __enter__(self) -> CpuMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per process between two ``time.monotonic()`` moments (sampled: +-20 ms)."""
        if not self._times:
            return {}
        first = max(0, bisect.bisect_right(self._times, start) - 1)
        last = min(len(self._times) - 1, bisect.bisect_left(self._times, end))
        a, b = self._samples[first], self._samples[last]
        return {name: b[name] - a[name] for name in b if name in a}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._samples.append(self._read())
            self._times.append(time.monotonic())

    def _read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, pid in self.processes.items():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # not Linux, or the process has ended
            out[name] = (int(fields[11]) + int(fields[12])) / self._tick  # utime + stime
        return out


def describe_cpu(used: dict[str, float], seconds: float, cores: int) -> str:
    """E.g. ``kube-apiserver 1.72 + etcd 0.49 + ... = 2.57 CPU-s, 97 % of 2 cores``."""
    if not used:
        return "CPU not measured"
    total = sum(used.values())
    parts = " + ".join(f"{name} {value:.2f}" for name, value in used.items())
    return f"{parts} = {total:.2f} CPU-s, {100 * total / (seconds * cores):.0f} % of {cores} cores"
