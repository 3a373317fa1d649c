"""Bad settings, bad credentials and an unreachable API server end with one clear line."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cluster import ROOT


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vk_provider", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "PYTHONPATH": str(ROOT)},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("vk-provider: error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


UNREACHABLE_KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: abc}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
"""


@pytest.mark.parametrize(
    ("kubeconfig_text", "needles"),
    [
        (None, ("no such file",)),
        ("this: [is not a kubeconfig", ("invalid kubeconfig",)),
        ("apiVersion: v1\nkind: Config\n", ("kubeconfig",)),
        (UNREACHABLE_KUBECONFIG, ("cannot reach the API server", "127.0.0.1:1")),
    ],
    ids=["missing", "garbage", "empty", "unreachable"],
)
def test_bad_kubeconfig(tmp_path: Path, kubeconfig_text: str | None, needles: tuple[str, ...]) -> None:
    path = tmp_path / "kubeconfig"
    if kubeconfig_text is not None:
        path.write_text(kubeconfig_text)
    settings = tmp_path / "s.yaml"
    settings.write_text("kube: {startup_timeout_seconds: 1}\n")
    proc = run_cli("run", "--kubeconfig", str(path), "--config", str(settings), cwd=tmp_path)
    assert_one_line_error(proc, *needles)


def test_a_kubeconfig_that_is_a_directory(tmp_path: Path) -> None:
    proc = run_cli("run", "--kubeconfig", str(tmp_path), cwd=tmp_path)
    assert_one_line_error(proc, f"kubeconfig {tmp_path}: a directory, not a file")


def test_no_kubeconfig_anywhere(tmp_path: Path) -> None:
    proc = run_cli("run", cwd=tmp_path)
    assert_one_line_error(proc, "no cluster credentials", ".kube/config")


@pytest.mark.parametrize(
    ("settings_text", "needles"),
    [
        ("node: {nmae: x}\n", ("unknown setting node.nmae",)),
        ("node: {pods: many}\n", ("node.pods", "whole number")),
        ("node: [1, 2\n", ("settings file",)),
        ("node: {name: Not_A_DNS_Name}\n", ("node.name",)),
        ("node: {on_shutdown: vanish}\n", ("node.on_shutdown", "'delete'")),
        ("- a list\n", ("mapping",)),
        ("registry: {db: ':memory:'}\n", ("registry.db", "an in-memory database is lost")),
        ("registry: {db: 'mysql://u@h/d'}\n", ("registry.db", "SQLite (a file) or PostgreSQL, not mysql")),
    ],
    ids=[
        "unknown-key",
        "bad-type",
        "bad-yaml",
        "bad-node-name",
        "bad-choice",
        "not-a-mapping",
        "in-memory-db",
        "mysql",
    ],
)
def test_invalid_settings_file(tmp_path: Path, settings_text: str, needles: tuple[str, ...]) -> None:
    settings = tmp_path / "s.yaml"
    settings.write_text(settings_text)
    proc = run_cli("run", "--config", str(settings), cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc, *needles)


def test_missing_settings_file(tmp_path: Path) -> None:
    proc = run_cli("run", "--config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert_one_line_error(proc, "cannot read settings file")


def test_demo_does_not_offer_the_db_flag_it_refuses() -> None:
    from vk_provider.cli import build_parser

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert "--db" not in subcommands.choices["demo"].format_help()
    assert "--db PATH_OR_URL" in subcommands.choices["run"].format_help()


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--time-scale", "inf"], ("--time-scale must be a positive number",)),
        (["--time-scale", "0"], ("--time-scale must be a positive number",)),
        (["--db", "x.db"], ("demo keeps its registry in its work directory", "--workdir")),
    ],
    ids=["infinite-time-scale", "zero-time-scale", "db"],
)
def test_demo_flags_refused_before_anything_starts(tmp_path: Path, flags: list[str], needles: tuple[str, ...]) -> None:
    proc = run_cli("demo", *flags, cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc, *needles)
    assert list(tmp_path.iterdir()) == []  # no database, no work directory, no control plane
