"""The agent runs with deploy/20-rbac.yaml's ServiceAccount and nothing more (issue: run in kind).

The RBAC objects are applied as shipped, renamed only where a shared test cluster needs it: their
own namespace, a unique suffix on cluster-scoped names, and the test's node name in place of
``virtual-kubelet`` (exactly what deploy/20-rbac.yaml tells users to change for another name).
The agent then gets a kubeconfig holding only that ServiceAccount's token.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_manifests import install_crd
from tests.support.agent import AgentProcess
from tests.support.cluster import ROOT, Cluster
from tests.support.fixtures import pod_manifest, unique
from tests.support.wait import wait_for

RBAC = ROOT / "deploy" / "20-rbac.yaml"
SHIPPED_NAMESPACE = "vk-provider"
SHIPPED_NODE = "virtual-kubelet"
FAST = {
    "pull": {"time_scale": 20, "jitter": 0, "cache_build_bandwidth": 100e6},
    "caches": {"snapshot_seconds": 0.5},
    "node": {"on_shutdown": "delete"},
}
AUTO = {"k8s.aliyun.com/eci-image-cache": "true"}
INSTANCE = "k8s.aliyun.com/eci-instance-id"
MATCHED = "k8s.aliyun.com/eci-matched-image-cache"


@dataclass(frozen=True)
class Installed:
    namespace: str  # the ServiceAccount's
    service_account: str
    node: str
    suffix: str  # on the cluster-scoped names
    kubeconfig: Path
    token: str

    @property
    def account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"

    def cluster_role(self, shipped_name: str) -> str:
        return f"{shipped_name}-{self.suffix}"


def rendered_rbac(namespace: str, node: str, suffix: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    for doc in docs:
        meta = doc["metadata"]
        if doc["kind"] in cluster_scoped:
            meta["name"] = f"{meta['name']}-{suffix}"
        if meta.get("namespace") == SHIPPED_NAMESPACE:
            meta["namespace"] = namespace
        if doc["kind"] == "ClusterRoleBinding":
            doc["roleRef"]["name"] = f"{doc['roleRef']['name']}-{suffix}"
        for subject in doc.get("subjects", []):
            assert subject["namespace"] == SHIPPED_NAMESPACE
            subject["namespace"] = namespace
        for rule in doc.get("rules", []):
            if rule.get("resourceNames") == [SHIPPED_NODE]:
                rule["resourceNames"] = [node]
    return docs


def service_account_token(cluster: Cluster, namespace: str, account: str) -> tuple[str, str]:
    """(token, CA in base64) from a token Secret that the controller-manager fills in.

    On v1.20 the controller-manager also makes one by itself; asking for one explicitly works on
    every version, including kind's (>= 1.24, where none is made automatically).
    """
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/service-account-token",
        "metadata": {
            "name": f"{account}-token",
            "namespace": namespace,
            "annotations": {"kubernetes.io/service-account.name": account},
        },
    }
    cluster.apply(json.dumps(secret))

    def filled() -> dict[str, str] | None:
        found = cluster.get_json("secret", f"{account}-token", "-n", namespace)
        data: dict[str, str] = (found or {}).get("data") or {}
        return data if data.get("token") and data.get("ca.crt") else None

    data = wait_for(filled, timeout=30, what="the ServiceAccount token")
    return base64.b64decode(data["token"]).decode(), data["ca.crt"]


def token_kubeconfig(path: Path, server: str, ca_b64: str, token: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority-data": ca_b64}}],
                "users": [{"name": "vk-provider", "user": {"token": token}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "vk-provider"}}],
                "current-context": "c",
            }
        )
    )
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def installed(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    install_crd(cluster)  # applied by an admin, as the Deployment expects
    suffix = unique("rbac").split("-")[1]
    namespace, node = f"vkp-{suffix}", f"vk-rbac-{suffix}"
    docs = rendered_rbac(namespace, node, suffix)
    cluster.apply(json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}))
    cluster.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    [account] = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    token, ca = service_account_token(cluster, namespace, account)
    server = yaml.safe_load(Path(cluster.kubeconfig).read_text())["clusters"][0]["cluster"]["server"]
    try:
        yield Installed(
            namespace=namespace,
            service_account=account,
            node=node,
            suffix=suffix,
            kubeconfig=token_kubeconfig(tmp_path_factory.mktemp("rbac") / "sa.kubeconfig", server, ca, token),
            token=token,
        )
    finally:
        for doc in docs:
            if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
                cluster.kubectl(
                    "delete", doc["kind"].lower(), doc["metadata"]["name"], "--ignore-not-found", check=False
                )
            elif doc["kind"] in ("Role", "RoleBinding"):
                cluster.kubectl(
                    "delete", doc["kind"].lower(), doc["metadata"]["name"], "-n", doc["metadata"]["namespace"],
                    "--ignore-not-found", check=False,
                )  # fmt: skip
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "node", node, "--ignore-not-found", check=False)


def can_i(cluster: Cluster, account: str, *args: str) -> bool:
    proc = cluster.kubectl_raw("auth", "can-i", *args, f"--as={account}")
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl auth can-i {' '.join(args)}: {proc.stderr.strip()}"
    return answer == "yes"


def as_agent(cluster: Cluster, kubeconfig: Path, *args: str) -> tuple[int, str]:
    proc = cluster.kubectl_raw("--kubeconfig", str(kubeconfig), *args)
    return proc.returncode, proc.stdout + proc.stderr


def phase(cluster: Cluster, namespace: str, name: str) -> str:
    found = cluster.get_json("pod", name, "-n", namespace)
    return str(found["status"].get("phase", "")) if found else "<gone>"


def pod_annotations(cluster: Cluster, namespace: str, name: str) -> dict[str, str]:
    found = cluster.get_json("pod", name, "-n", namespace)
    return dict((found or {}).get("metadata", {}).get("annotations") or {})


def cache_phase(cluster: Cluster, name: str) -> str:
    found = cluster.get_json("imagecache", name)
    return str(((found or {}).get("status") or {}).get("phase", ""))


def seed_pod(name: str, node: str, namespace: str, image: str) -> dict[str, Any]:
    """The seed's automatic-matching Pod, on the test's node, with the test's image."""
    manifest = pod_manifest(name, node, image=image, annotations=AUTO)
    manifest["metadata"]["namespace"] = namespace
    return manifest


def kubelet_get(port: int, path: str, token: str) -> tuple[int, str]:
    """A request to the agent's kubelet endpoint (self-signed), with a bearer token."""
    request = urllib.request.Request(f"https://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"})
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def test_agent_with_only_the_service_account_registers_runs_pods_and_serves_logs(
    cluster: Cluster, installed: Installed, namespace: str, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in deploy/30-agent.yaml: the CRD is installed by an admin, not by the agent.
    monkeypatch.setenv("VK_PROVIDER_CACHES_INSTALL_CRD", "false")
    agent = AgentProcess(
        cluster, workdir, node_name=installed.node, settings=FAST, kubeconfig=str(installed.kubeconfig)
    )
    with agent:
        agent.wait_ready()
        assert f"using kubeconfig {installed.kubeconfig}" in agent.log
        lease = cluster.get_json("lease", "-n", "kube-node-lease", installed.node)
        assert lease["spec"]["holderIdentity"] == installed.node

        # A Pod bound to the node runs: pods list/watch, pods/status patch, events create.
        cluster.apply(
            json.dumps(
                {**pod_manifest("rbac-pod", installed.node), "metadata": {"name": "rbac-pod", "namespace": namespace}}
            )
        )
        wait_for(lambda: phase(cluster, namespace, "rbac-pod") == "Running", timeout=30, what="Running")
        events = cluster.get_json("events", "-n", namespace, "--field-selector", "involvedObject.name=rbac-pod")
        assert "Started" in {e["reason"] for e in events["items"]}

        # kubectl logs: the API server's client certificate, authorized with a SubjectAccessReview.
        assert "started container nginx" in cluster.kubectl("logs", "-n", namespace, "rbac-pod")
        # A bearer token is authenticated with a TokenReview: the agent's own token is recognised
        # (403 naming the account, not 401) and refused, since it may not read nodes/proxy.
        port = cluster.get_json("node", installed.node)["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        status, body = kubelet_get(port, "/pods", installed.token)
        assert (status, installed.account in body) == (403, True), body
        assert kubelet_get(port, "/pods", "not-a-token")[0] == 401

        # Deleting the Pod: the agent stops it and removes it for good (pods delete).
        cluster.kubectl("delete", "pod", "rbac-pod", "-n", namespace, "--wait=false")
        wait_for(lambda: phase(cluster, namespace, "rbac-pod") == "<gone>", timeout=30, what="the Pod removed")

        # ImageCaches: a Pod that misses gets an automatic cache (imagecaches create, pods patch for
        # its instance id); the cache is built (imagecaches/status patch); the next Pod hits it.
        # The image is this test's own, so no other test's cache can match it.
        image = f"registry.example.com/vk-rbac/app-{installed.suffix}:1"
        cluster.apply(json.dumps(seed_pod("rbac-miss", installed.node, namespace, image)))
        wait_for(lambda: phase(cluster, namespace, "rbac-miss") == "Running", timeout=30, what="miss Running")
        instance = wait_for(lambda: pod_annotations(cluster, namespace, "rbac-miss").get(INSTANCE), what="instance id")
        auto_cache = f"auto-create-for-{instance}"
        try:
            wait_for(lambda: cache_phase(cluster, auto_cache) == "Ready", timeout=60, what=f"{auto_cache} Ready")
            cluster.apply(json.dumps(seed_pod("rbac-hit", installed.node, namespace, image)))
            wait_for(lambda: phase(cluster, namespace, "rbac-hit") == "Running", timeout=30, what="hit Running")
            cache_id = cluster.get_json("imagecache", auto_cache)["status"]["imageCacheId"]
            assert pod_annotations(cluster, namespace, "rbac-hit").get(MATCHED) == cache_id
        finally:
            cluster.kubectl("delete", "imagecache", auto_cache, "--ignore-not-found", "--wait=false", check=False)

        # Nothing the agent tried was refused.
        log = agent.log
        assert "forbidden" not in log.lower(), log[-3000:]
        assert agent.stop() == 0, agent.log[-3000:]
    # node.on_shutdown: delete, so nodes delete is exercised too.
    assert cluster.get_json("node", installed.node) is None
    assert "forbidden" not in agent.log.lower(), agent.log[-3000:]


@pytest.mark.parametrize(
    ("args", "allowed"),
    [
        # What the agent needs, on its own node and Lease...
        (("create", "nodes"), True),
        (("get", "nodes/{node}"), True),
        (("patch", "nodes/{node}"), True),
        (("delete", "nodes/{node}"), True),
        (("patch", "nodes/{node}", "--subresource=status"), True),
        (("create", "leases", "-n", "kube-node-lease"), True),
        (("patch", "leases/{node}", "-n", "kube-node-lease"), True),
        (("watch", "pods", "--all-namespaces"), True),
        (("patch", "pods", "--subresource=status", "-n", "default"), True),
        (("create", "events", "-n", "default"), True),
        (("patch", "events", "-n", "default"), True),
        (("create", "tokenreviews.authentication.k8s.io"), True),
        (("create", "subjectaccessreviews.authorization.k8s.io"), True),
        (("watch", "imagecaches.eci.alibabacloud.com"), True),
        (("create", "imagecaches.eci.alibabacloud.com"), True),
        (("delete", "imagecaches.eci.alibabacloud.com/any"), True),
        (("patch", "imagecaches.eci.alibabacloud.com/any", "--subresource=status"), True),
        # ...and not another node's, nor anything else.
        (("patch", "nodes/someone-else"), False),
        (("patch", "nodes/someone-else", "--subresource=status"), False),
        (("delete", "nodes/someone-else"), False),
        (("list", "nodes"), False),
        (("patch", "leases/someone-else", "-n", "kube-node-lease"), False),
        (("patch", "leases/{node}", "-n", "default"), False),
        (("create", "pods", "-n", "default"), False),
        (("update", "pods/status", "-n", "default"), False),
        (("get", "secrets", "-n", "default"), False),
        (("list", "secrets", "--all-namespaces"), False),
        (("list", "configmaps", "-n", "kube-system"), False),
        (("create", "deployments.apps", "-n", "default"), False),
        (("create", "customresourcedefinitions.apiextensions.k8s.io"), False),
        (("get", "customresourcedefinitions.apiextensions.k8s.io/imagecaches.eci.alibabacloud.com"), False),
        (("create", "clusterrolebindings.rbac.authorization.k8s.io"), False),
        (("create", "pods/exec", "-n", "default"), False),
        (("patch", "imagecaches.eci.alibabacloud.com/any"), False),
        (("update", "imagecaches.eci.alibabacloud.com/any"), False),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else str(v),
)
def test_the_role_grants_exactly_what_the_agent_needs(
    cluster: Cluster, installed: Installed, args: tuple[str, ...], allowed: bool
) -> None:
    resolved = [a.replace("{node}", installed.node) for a in args]
    assert can_i(cluster, installed.account, *resolved) is allowed


def test_outside_the_role_the_token_is_refused(cluster: Cluster, installed: Installed) -> None:
    code, out = as_agent(cluster, installed.kubeconfig, "get", "secrets", "--all-namespaces")
    assert code != 0
    assert "forbidden" in out.lower()
    code, out = as_agent(
        cluster, installed.kubeconfig, "create", "deployment", "intruder", "--image=nginx", "-n", installed.namespace
    )
    assert code != 0
    assert "forbidden" in out.lower()
    # The token itself works: what the role allows goes through.
    code, out = as_agent(cluster, installed.kubeconfig, "get", "imagecaches")
    assert code == 0, out


CRDS = "customresourcedefinitions.apiextensions.k8s.io"


@pytest.mark.parametrize(
    ("shipped_role", "binding_args", "granted", "still_denied"),
    [
        # What deploy/20-rbac.yaml tells users to run when the agent installs the CRD itself...
        (
            "vk-provider-crd-installer",
            ("clusterrolebinding",),
            [("create", CRDS), ("get", f"{CRDS}/imagecaches.eci.alibabacloud.com")],
            [("get", f"{CRDS}/someone-elses.example.com"), ("delete", f"{CRDS}/imagecaches.eci.alibabacloud.com"),
             ("patch", f"{CRDS}/imagecaches.eci.alibabacloud.com")],
        ),
        # ...and, per namespace, when it reads Pods' imagePullSecrets (images.unknown_images: registry).
        (
            "vk-provider-pull-secrets",
            ("rolebinding", "-n", "default"),
            [("get", "secrets/any", "-n", "default")],
            [("get", "secrets/any", "-n", "kube-system"), ("list", "secrets", "-n", "default"),
             ("watch", "secrets", "-n", "default")],
        ),
    ],
    ids=["crd-installer", "pull-secrets"],
)  # fmt: skip
def test_the_optional_roles_grant_only_their_feature_and_only_when_bound(
    cluster: Cluster,
    installed: Installed,
    shipped_role: str,
    binding_args: tuple[str, ...],
    granted: list[tuple[str, ...]],
    still_denied: list[tuple[str, ...]],
) -> None:
    assert not any(can_i(cluster, installed.account, *check) for check in granted)
    binding = f"{shipped_role}-{installed.suffix}"
    kind, *where = binding_args
    cluster.kubectl(
        "create", kind, binding, *where, f"--clusterrole={installed.cluster_role(shipped_role)}",
        f"--serviceaccount={installed.namespace}:{installed.service_account}",
    )  # fmt: skip
    try:
        wait_for(lambda: can_i(cluster, installed.account, *granted[0]), timeout=10, what="the binding to apply")
        assert all(can_i(cluster, installed.account, *check) for check in granted)
        assert not any(can_i(cluster, installed.account, *check) for check in still_denied)
    finally:
        # The other tests share the ServiceAccount: take the grant back.
        cluster.kubectl("delete", kind, binding, *where)
    wait_for(lambda: not can_i(cluster, installed.account, *granted[0]), timeout=10, what="the grant to go")
