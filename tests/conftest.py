"""Test-session fixtures: one real control plane for all integration tests.

Integration tests (everything under tests/integration) are marked ``integration`` automatically.
They are never skipped: if the control plane cannot be built or started, they fail.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, external_cluster, start_control_plane

# The node-lifecycle controller's grace period in the test control plane: short, so that a test can
# show within seconds that the agent keeps its Node Ready (and that a silent Node goes NotReady).
NODE_GRACE_SECONDS = 10
KCM_ARGS = f"--node-monitor-grace-period={NODE_GRACE_SECONDS}s --node-monitor-period=1s"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    counts: dict[str, int] = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", "call") in ("call", "setup") and "integration" in getattr(
                report, "keywords", {}
            ):
                if outcome == "passed" and report.when != "call":
                    continue
                counts[outcome] = counts.get(outcome, 0) + 1
    if counts:
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        terminalreporter.write_line(f"integration tests (real kube-apiserver, SQLite, PostgreSQL, registry): {summary}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    external = external_cluster()
    if external is not None:
        yield external
        return
    directory = Path(tempfile.mkdtemp(prefix="vkp-cp-"))
    started = start_control_plane(directory, kcm_args=KCM_ARGS)
    try:
        yield started
    finally:
        started.down()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


from tests.support.fixtures import namespace  # noqa: E402,F401  (a fixture shared by the integration tests)
