"""The README's first command, end to end: its own control plane, the seed's examples, the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.cluster import ROOT
from vk_provider.catalogs import load_catalogs
from vk_provider.domain.pullmodel import PullPolicy, PullSettings, estimate_pod_start_seconds, plan_pod_pull


def model_ratio() -> float:
    """What the pull model predicts for nginx:1.7.9: start-up without a cache / with one."""
    manifest = load_catalogs().get("docker.io/library/nginx:1.7.9")
    assert manifest is not None
    settings = PullSettings(jitter=0)
    images = [(manifest, PullPolicy.IF_NOT_PRESENT)]
    miss = estimate_pod_start_seconds(plan_pod_pull(images, (), ()), settings)
    hit = estimate_pod_start_seconds(plan_pod_pull(images, (), {manifest.reference}), settings)
    return miss / hit


def test_demo_shows_the_comparison_and_leaves_nothing_behind(tmp_path: Path) -> None:
    before = subprocess.run(["pgrep", "-f", "vk-provider-demo-"], capture_output=True, text=True).stdout.split()
    proc = subprocess.run(
        [sys.executable, "-m", "vk_provider", "demo", "--workdir", str(tmp_path), "--log-level", "WARNING"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for step in ("baseline Pod", "auto-match Pod", "auto-match Deployment", "explicit Pod", "speed-up of cache hits"):
        assert step in out, out
    chart = tmp_path / "registry-report.html"
    assert f"chart: {chart}" in out
    assert "<svg" in chart.read_text()
    assert "local control plane stopped and removed" in out
    after = subprocess.run(["pgrep", "-f", "vk-provider-demo-"], capture_output=True, text=True).stdout.split()
    assert set(after) <= set(before)  # no etcd / apiserver / controller-manager left running

    db = tmp_path / "registry.db"
    report = subprocess.run(
        [sys.executable, "-m", "vk_provider", "report", "--db", str(db), "--json", "--no-chart"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    rows = {r["outcome"]: r for r in json.loads(report.stdout)["outcomes"]}
    assert {k: v["pods"] for k, v in rows.items()} == {"none": 1, "miss": 1, "auto_hit": 2, "explicit_hit": 1}
    view = subprocess.run(
        ["sqlite3", "-json", str(db), "select * from pod_start_by_outcome"], capture_output=True, text=True, check=True
    )
    for row in json.loads(view.stdout):
        mine = rows[row["cache_outcome"]]
        assert mine["pods"] == row["pods"]
        assert abs(mine["mean_seconds"] - row["avg_startup_seconds"]) < 1e-6
        assert mine["bytes_pulled"] == row["total_bytes_pulled"]
    measured = rows["miss"]["p50_seconds"] / rows["auto_hit"]["p50_seconds"]
    predicted = model_ratio()
    assert predicted > 2
    assert abs(measured - predicted) / predicted < 0.3, (measured, predicted)
