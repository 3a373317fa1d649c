"""The registry client against a real registry: Debian's ``docker-registry`` (distribution 2.8).

Each registry runs from its own temporary config (storage in a temp dir, ``http.addr`` on a free
loopback port) and is stopped when the module's tests end. The tests push images by hand through
the Distribution API (blob uploads, then manifests: plain OCI and Docker schema 2, and an OCI
index for linux/amd64 and linux/arm64), then resolve them with :class:`RegistryClient` and the
image service, and compare with what they pushed. Needs ``apt-get install docker-registry``
(``hack/system-deps.sh``); without it these tests fail, they are never skipped.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.cluster import Cluster
from tests.support.fixtures import pod_manifest, start_agent
from tests.support.wait import wait_for
from vk_provider.controllers.images import CatalogImages
from vk_provider.controllers.pods import CacheDecision, ImagePullError
from vk_provider.controllers.puller import Puller
from vk_provider.domain.catalog import Catalog
from vk_provider.domain.images import ImageRef, parse_reference
from vk_provider.domain.model import ImageManifest
from vk_provider.domain.podspec import ContainerSpec, PodFacts
from vk_provider.domain.pullmodel import PullSettings
from vk_provider.oci import Credentials, ErrorReason, Platform, RegistryClient, RegistryError
from vk_provider.oci.client import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, UNCOMPRESSED_RATIO
from vk_provider.registry import Registry, open_registry
from vk_provider.registry.migrate import upgrade

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
FAST = replace(PullSettings(), time_scale=1e6, jitter=0.0)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- running docker-registry


@dataclass
class LocalRegistry:
    process: subprocess.Popen[bytes]
    directory: Path
    port: int
    user: tuple[str, str] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def log(self) -> str:
        path = self.directory / "registry.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _bcrypt(password: str) -> str:
    # htpasswd files need bcrypt; Debian's libcrypt has it. The crypt module is deprecated (3.11)
    # but present in the Python this project targets; its DeprecationWarning is not ours.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
    assert hashed, "libcrypt cannot make bcrypt hashes for the htpasswd file"
    assert hashed.startswith("$2"), hashed
    return hashed


def start_registry(user: tuple[str, str] | None = None) -> LocalRegistry:
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail(
            "docker-registry is not installed: run `bash hack/system-deps.sh` as root "
            "(or `apt-get install docker-registry`); these tests need a real registry",
            pytrace=False,
        )
    directory = Path(tempfile.mkdtemp(prefix="vkp-oci-"))
    port = _free_port()
    auth = ""
    if user is not None:
        (directory / "htpasswd").write_text(f"{user[0]}:{_bcrypt(user[1])}\n")
        auth = f"auth:\n  htpasswd:\n    realm: vk-provider-test\n    path: {directory / 'htpasswd'}\n"
    (directory / "config.yml").write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {directory / 'storage'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: vk-provider-test\n"
        f"{auth}"
    )
    with (directory / "registry.log").open("wb") as log:
        process = subprocess.Popen(
            [binary, "serve", str(directory / "config.yml")], stdout=log, stderr=subprocess.STDOUT, cwd=directory
        )
    started = LocalRegistry(process, directory, port, user)

    def answering() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"docker-registry exited with {process.returncode}:\n{started.log()}")
        try:
            with urllib.request.urlopen(f"{started.url}/v2/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # 401 with htpasswd: it is answering
        except OSError:
            return False

    try:
        wait_for(answering, timeout=30, what=f"docker-registry on {started.host}")
    except BaseException:
        started.stop()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return started


@pytest.fixture(scope="module")
def registry() -> Iterator[LocalRegistry]:
    started = start_registry()
    try:
        yield started
    finally:
        started.stop()
        shutil.rmtree(started.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def private_registry() -> Iterator[LocalRegistry]:
    started = start_registry(user=("alice", "wonderland"))
    try:
        yield started
    finally:
        started.stop()
        shutil.rmtree(started.directory, ignore_errors=True)


# ---------------------------------------------------------------- pushing by hand


@dataclass(frozen=True)
class Pushed:
    digest: str
    layers: tuple[tuple[str, int], ...]


class Pusher:
    """Pushes blobs and manifests through the Distribution API, as `docker push` does."""

    def __init__(self, session: aiohttp.ClientSession, registry: LocalRegistry) -> None:
        self.session = session
        self.registry = registry
        self.headers: dict[str, str] = {}
        if registry.user is not None:
            pair = f"{registry.user[0]}:{registry.user[1]}".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()

    async def blob(self, repository: str, data: bytes) -> str:
        digest = sha(data)
        async with self.session.post(
            f"{self.registry.url}/v2/{repository}/blobs/uploads/", headers=self.headers
        ) as started:
            assert started.status == 202, await started.text()
            location = started.headers["Location"]
        if location.startswith("/"):
            location = self.registry.url + location
        separator = "&" if "?" in location else "?"
        async with self.session.put(
            f"{location}{separator}digest={digest}",
            data=io.BytesIO(data),  # aiohttp warns about big bytes bodies
            headers={**self.headers, "Content-Type": "application/octet-stream"},
        ) as done:
            assert done.status == 201, await done.text()
            assert done.headers["Docker-Content-Digest"] == digest
        return digest

    async def manifest(self, repository: str, reference: str, media_type: str, body: bytes) -> str:
        async with self.session.put(
            f"{self.registry.url}/v2/{repository}/manifests/{reference}",
            data=body,
            headers={**self.headers, "Content-Type": media_type},
        ) as response:
            assert response.status == 201, await response.text()
            assert response.headers["Docker-Content-Digest"] == sha(body)
        return sha(body)

    async def image(
        self,
        repository: str,
        reference: str,
        layer_sizes: Sequence[int],
        *,
        media_type: str = OCI_MANIFEST,
        os: str = "linux",
        architecture: str = "amd64",
        rng: random.Random,
    ) -> Pushed:
        """Random layers (so every digest is new) and a config, then the manifest under ``reference``."""
        layers = [await self.blob(repository, rng.randbytes(size)) for size in layer_sizes]
        config = json.dumps(
            {"architecture": architecture, "os": os, "rootfs": {"type": "layers", "diff_ids": layers}}
        ).encode()
        config_digest = await self.blob(repository, config)
        oci = media_type == OCI_MANIFEST
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": media_type,
                "config": {
                    "mediaType": OCI_CONFIG if oci else DOCKER_CONFIG,
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": [
                    {"mediaType": OCI_LAYER if oci else DOCKER_LAYER, "digest": digest, "size": size}
                    for digest, size in zip(layers, layer_sizes, strict=True)
                ],
            }
        ).encode()
        digest = await self.manifest(repository, reference, media_type, body)
        return Pushed(digest, tuple(zip(layers, layer_sizes, strict=True)))

    async def index(self, repository: str, tag: str, entries: Mapping[tuple[str, str], Pushed]) -> str:
        manifests = []
        for (system, architecture), pushed in entries.items():
            async with self.session.get(
                f"{self.registry.url}/v2/{repository}/manifests/{pushed.digest}",
                headers={**self.headers, "Accept": OCI_MANIFEST},
            ) as response:
                size = len(await response.read())
            manifests.append(
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": pushed.digest,
                    "size": size,
                    "platform": {"os": system, "architecture": architecture},
                }
            )
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
        return await self.manifest(repository, tag, OCI_INDEX, body)


@pytest.fixture
async def pusher(registry: LocalRegistry) -> AsyncIterator[Pusher]:
    async with aiohttp.ClientSession() as session:
        yield Pusher(session, registry)


def ref(registry: LocalRegistry, path: str) -> ImageRef:
    parsed = parse_reference(f"{registry.host}/{path}")
    assert isinstance(parsed, ImageRef)
    return parsed


def layers_of(found: ImageManifest | RegistryError) -> list[tuple[str, int]]:
    assert isinstance(found, ImageManifest), found
    return [(layer.digest, layer.size) for layer in found.layers]


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST], ids=["oci", "docker-schema2"])
async def test_a_pushed_image_resolves_to_its_real_layer_digests_and_sizes(
    registry: LocalRegistry, pusher: Pusher, media_type: str
) -> None:
    rng = random.Random(f"single {media_type}")
    pushed = await pusher.image("team/single", "v1", [180_000, 1_234_567, 4_321], media_type=media_type, rng=rng)
    async with RegistryClient(timeout=10) as client:
        found = await client.resolve(ref(registry, "team/single:v1"))
        by_digest = await client.resolve(ref(registry, f"team/single@{pushed.digest}"))
    assert layers_of(found) == list(pushed.layers)
    assert isinstance(found, ImageManifest)
    assert found.digest == pushed.digest
    assert found.size == 180_000 + 1_234_567 + 4_321
    assert [layer.uncompressed_size for layer in found.layers] == [
        round(size * UNCOMPRESSED_RATIO) for _, size in pushed.layers
    ]
    assert found.reference == f"{registry.host}/team/single:v1"
    assert found.source == "registry"
    assert layers_of(by_digest) == list(pushed.layers)


async def test_an_index_resolves_to_each_platforms_layers(registry: LocalRegistry, pusher: Pusher) -> None:
    rng = random.Random("index")
    amd64 = await pusher.image("team/multi", "amd64-only", [300_000, 70_000], rng=rng)
    arm64 = await pusher.image("team/multi", "arm64-only", [250_000, 60_000, 5_000], architecture="arm64", rng=rng)
    index_digest = await pusher.index("team/multi", "1.0", {("linux", "amd64"): amd64, ("linux", "arm64"): arm64})
    async with (
        RegistryClient(platform=Platform("linux", "amd64")) as on_amd64,
        RegistryClient(platform=Platform("linux", "arm64")) as on_arm64,
        RegistryClient(platform=Platform("linux", "ppc64le")) as on_power,
    ):
        for_amd64 = await on_amd64.resolve(ref(registry, "team/multi:1.0"))
        for_arm64 = await on_arm64.resolve(ref(registry, "team/multi:1.0"))
        for_power = await on_power.resolve(ref(registry, "team/multi:1.0"))
        # A plain manifest for another platform is caught by its config.
        arm_only = await on_amd64.resolve(ref(registry, "team/multi:arm64-only"))
    assert layers_of(for_amd64) == list(amd64.layers)
    assert layers_of(for_arm64) == list(arm64.layers)
    assert isinstance(for_amd64, ImageManifest)
    assert for_amd64.digest == index_digest
    assert isinstance(for_power, RegistryError)
    assert for_power.reason is ErrorReason.NO_PLATFORM
    assert isinstance(arm_only, RegistryError)
    assert arm_only.reason is ErrorReason.NO_PLATFORM


async def test_an_unknown_tag_is_manifest_unknown(registry: LocalRegistry) -> None:
    async with RegistryClient() as client:
        found = await client.resolve(ref(registry, "team/nothing:here"))
    assert isinstance(found, RegistryError)
    assert found.reason is ErrorReason.NOT_FOUND
    assert "not found" in found.message


async def test_basic_auth_with_htpasswd(private_registry: LocalRegistry) -> None:
    async with aiohttp.ClientSession() as session:
        pushed = await Pusher(session, private_registry).image("private/app", "1", [20_000], rng=random.Random(3))
    async with RegistryClient() as client:
        anonymous = await client.resolve(ref(private_registry, "private/app:1"))
        wrong = await client.resolve(ref(private_registry, "private/app:1"), Credentials("alice", "nope"))
        right = await client.resolve(ref(private_registry, "private/app:1"), Credentials("alice", "wonderland"))
    assert isinstance(anonymous, RegistryError)
    assert anonymous.reason is ErrorReason.UNAUTHORIZED
    assert isinstance(wrong, RegistryError)
    assert wrong.reason is ErrorReason.UNAUTHORIZED
    assert layers_of(right) == list(pushed.layers)


def pod_with(*images: str) -> PodFacts:
    return PodFacts(
        uid="uid-1",
        namespace="team",
        name="app",
        node_name="vk",
        created=None,
        restart_policy="Always",
        grace_seconds=30,
        containers=tuple(ContainerSpec(f"c{n}", image, "IfNotPresent") for n, image in enumerate(images)),
    )


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Registry]:
    opened = await open_registry(str(tmp_path / "registry.db"))
    await upgrade(opened.engine)
    try:
        yield opened
    finally:
        await opened.close()


async def test_the_image_service_plans_the_registrys_bytes_and_remembers_them(
    registry: LocalRegistry, pusher: Pusher, database: Registry
) -> None:
    rng = random.Random("service")
    base = await pusher.image("team/base", "1", [400_000, 30_000], rng=rng)
    app = await pusher.image("team/web", "2", [90_000], rng=rng)
    image, sidecar, missing = (
        f"{registry.host}/team/base:1",
        f"{registry.host}/team/web:2",
        f"{registry.host}/team/gone:1",
    )
    client = RegistryClient()
    images = CatalogImages(
        Catalog(), Puller(FAST, random.Random(1)), unknown="registry", resolver=client, store=database
    )
    try:
        planned = await images.for_pod(pod_with(image, sidecar, missing), CacheDecision())
        assert planned.plan.bytes_to_fetch == 400_000 + 30_000 + 90_000
        main, side, gone = pod_with(image, sidecar, missing).containers
        pulled = await planned.pull(main)
        assert pulled.downloaded == 430_000
        assert pulled.image_id == f"{registry.host}/team/base@{base.digest}"
        assert (await planned.pull(side)).downloaded == 90_000
        with pytest.raises(ImagePullError) as failure:
            await planned.pull(gone)
        assert failure.value.reason == "ErrImagePull"
        assert failure.value.retry
        assert "team/gone" in failure.value.message
    finally:
        await images.close()
    stored = await database.get_manifest(image)
    assert stored is not None
    assert [(layer.digest, layer.size) for layer in stored.layers] == list(base.layers)
    assert stored.source == "registry"
    assert stored.digest == base.digest
    assert (await database.get_manifest(sidecar)) is not None

    # The next start: the stored manifests are used, the registry is not contacted.
    again_client = RegistryClient()
    again = CatalogImages(
        Catalog(), Puller(FAST, random.Random(1)), unknown="registry", resolver=again_client, store=database
    )
    try:
        replanned = await again.for_pod(pod_with(image, sidecar), CacheDecision())
    finally:
        await again.close()
    assert replanned.plan.bytes_to_fetch == 520_000
    assert again_client.requests == 0
    assert [layer.digest for layer in replanned.plan.steps[1].layers_to_fetch] == [app.layers[0][0]]


def test_the_registry_binary_is_debians() -> None:
    # The tests above must have run against the packaged registry, not something else on PATH.
    binary = shutil.which("docker-registry")
    assert binary is not None
    owner = subprocess.run(["dpkg", "-S", os.path.realpath(binary)], capture_output=True, text=True, check=False)
    assert owner.stdout.startswith("docker-registry:"), owner.stdout + owner.stderr


# ---------------------------------------------------------------- end to end: the agent on a cluster


def test_a_pod_pulls_a_private_registry_image_with_its_pull_secret(
    cluster: Cluster, workdir: Path, namespace: str, private_registry: LocalRegistry
) -> None:
    async def push() -> Pushed:
        async with aiohttp.ClientSession() as session:
            return await Pusher(session, private_registry).image(
                "private/web", "3", [700_000, 45_000], rng=random.Random("e2e")
            )

    pushed = asyncio.run(push())
    size = sum(layer_size for _, layer_size in pushed.layers)
    config = {"auths": {private_registry.host: {"auth": base64.b64encode(b"alice:wonderland").decode()}}}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "regcred"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()},
    }
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(secret))
    settings = {"images": {"unknown_images": "registry"}, "pull": {"time_scale": 50, "jitter": 0}}
    with start_agent(cluster, workdir, settings) as agent:
        for name, image, secrets in (
            ("web", f"{private_registry.host}/private/web:3", [{"name": "regcred"}]),
            ("anonymous", f"{private_registry.host}/private/web:3", []),
        ):
            manifest = pod_manifest(name, agent.node_name, image=image)
            manifest["spec"]["imagePullSecrets"] = secrets
            cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(manifest))

        def status(name: str) -> dict[str, Any]:
            found = cluster.get_json("pod", name, "-n", namespace)
            return found.get("status", {}) if found else {}

        def waiting_reason(name: str) -> str:
            statuses = status(name).get("containerStatuses") or [{}]
            return str(statuses[0].get("state", {}).get("waiting", {}).get("reason", ""))

        wait_for(lambda: status("web").get("phase") == "Running", timeout=60, what="web Running")
        [container] = status("web")["containerStatuses"]
        assert container["imageID"] == f"{private_registry.host}/private/web@{pushed.digest}"
        events = cluster.get_json("events", "-n", namespace, "--field-selector", "involvedObject.name=web")["items"]
        pulled = [e["message"] for e in events if e["reason"] == "Pulled"]
        assert pulled, events
        assert f"Image size: {size} bytes" in pulled[0]
        # Without the Secret the registry refuses: ErrImagePull, then the kubelet's back-off.
        wait_for(
            lambda: waiting_reason("anonymous") in ("ErrImagePull", "ImagePullBackOff"),
            timeout=30,
            what="anonymous pod failing to pull",
        )
        failed = cluster.get_json("events", "-n", namespace, "--field-selector", "involvedObject.name=anonymous")
        messages = " ".join(e["message"] for e in failed["items"] if e["reason"] == "Failed")
        assert "requires credentials" in messages, messages
    # The manifest is in the agent's registry database for the next start.
    assert (
        "private/web:3"
        in subprocess.run(
            ["sqlite3", str(agent.db), "SELECT reference FROM images"], capture_output=True, text=True, check=True
        ).stdout
    )
