"""Fixtures for tests that run the agent against the session's control plane."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import AgentProcess
from tests.support.cluster import Cluster
from tests.support.wait import wait_for


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount, which Pod admission needs)."""
    name = unique("t")
    cluster.kubectl("create", "namespace", name)
    wait_for(lambda: cluster.get_json("serviceaccount", "default", "-n", name) is not None, timeout=30,
             what=f"default ServiceAccount in {name}")  # fmt: skip
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def start_agent(
    cluster: Cluster, workdir: Path, settings: dict[str, Any] | None = None, node: str | None = None
) -> AgentProcess:
    agent = AgentProcess(cluster, workdir, node_name=node or unique("vk"), settings=settings).start()
    agent.wait_ready()
    return agent


def pod_manifest(
    name: str,
    node: str,
    *,
    image: str = "nginx:1.7.9",
    annotations: dict[str, str] | None = None,
    restart_policy: str = "Always",
    extra_containers: list[dict[str, Any]] | None = None,
    init_containers: list[dict[str, Any]] | None = None,
    resources: dict[str, Any] | None = None,
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "nginx", "image": image, "imagePullPolicy": "IfNotPresent"}
    if resources is not None:
        container["resources"] = resources
    spec: dict[str, Any] = {
        "nodeName": node,
        "restartPolicy": restart_policy,
        "containers": [container, *(extra_containers or [])],
    }
    if init_containers:
        spec["initContainers"] = init_containers
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": spec,
    }
