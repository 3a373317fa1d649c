"""Every manifest in deploy/ and examples/ is accepted by a real API server (`kubectl apply --dry-run=server`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import ROOT, Cluster
from tests.support.wait import wait_for

CRD = ROOT / "config" / "crd-imagecache.yaml"
CRD_NAME = "imagecaches.eci.alibabacloud.com"
MANIFESTS = sorted((ROOT / "deploy").glob("*.yaml")) + sorted((ROOT / "examples").glob("*.yaml"))


def install_crd(cluster: Cluster) -> None:
    """The ImageCache CRD, for real: objects of its kind cannot even be dry-run without it."""
    assert CRD.is_file(), "config/crd-imagecache.yaml is missing"
    cluster.kubectl("apply", "-f", str(CRD))

    def established() -> bool:
        crd = cluster.get_json("crd", CRD_NAME)
        conditions = (crd or {}).get("status", {}).get("conditions", [])
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    wait_for(established, timeout=30, what=f"CRD {CRD_NAME} Established")


@pytest.fixture(scope="module")
def prepared(cluster: Cluster) -> Iterator[Cluster]:
    install_crd(cluster)
    # Namespaced objects of deploy/ cannot be dry-run into a namespace that a dry run "created":
    # make it for real, and remove it afterwards only if this test made it.
    created = cluster.get_json("namespace", "vk-provider") is None
    if created:
        cluster.kubectl("apply", "-f", str(ROOT / "deploy" / "00-namespace.yaml"))
    wait_for(lambda: cluster.get_json("serviceaccount", "default", "-n", "default") is not None, what="default SA")
    yield cluster
    if created:
        cluster.kubectl("delete", "namespace", "vk-provider", "--wait=false", check=False)


def test_there_are_manifests_to_check() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in MANIFESTS}
    assert {
        "deploy/00-namespace.yaml",
        "deploy/10-crd-imagecache.yaml",
        "deploy/20-rbac.yaml",
        "deploy/30-agent.yaml",
        "examples/nginx-deployment-auto.yaml",
        "examples/nginx-auto-match.yaml",
        "examples/nginx-deployment-imagecache-id.yaml",
        "examples/nginx-imagecache-id.yaml",
        "examples/nginx-no-cache.yaml",
        "examples/imagecache-nginx.yaml",
    } <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_manifest_is_accepted_by_the_api_server(prepared: Cluster, path: Path) -> None:
    proc = prepared.kubectl_raw("apply", "--dry-run=server", "-f", str(path), "-o", "name")
    assert proc.returncode == 0, f"{path.name}: {proc.stderr.strip()}"
    assert proc.stdout.strip(), f"{path.name}: nothing applied"


def test_the_dry_run_rejects_a_broken_manifest(prepared: Cluster, tmp_path: Path) -> None:
    # The check above must be able to fail: an ImageCache breaking the CRD's schema is refused.
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "apiVersion: eci.alibabacloud.com/v1\nkind: ImageCache\nmetadata: {name: broken}\n"
        "spec: {images: [nginx:1.7.9], imageCacheSize: 5}\n"
    )
    proc = prepared.kubectl_raw("apply", "--dry-run=server", "-f", str(broken))
    assert proc.returncode != 0
    assert "imageCacheSize" in proc.stderr
