"""The OCI registry client against an in-process registry (aiohttp.web on 127.0.0.1), registry
credentials from Docker config Secrets, and the image service resolving unknown images through a
registry (with fakes for the resolver, the manifest store and the Secrets)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import random
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from aiohttp import web

from tests.support.wait import await_for
from vk_provider.controllers.images import CatalogImages, UnknownImages
from vk_provider.controllers.pods import CacheDecision, ImagePullError
from vk_provider.controllers.puller import Puller
from vk_provider.domain.catalog import Catalog
from vk_provider.domain.images import ImageRef, parse_reference
from vk_provider.domain.model import ImageManifest, Layer
from vk_provider.domain.podspec import ContainerSpec, PodFacts
from vk_provider.domain.pullmodel import PullSettings
from vk_provider.kube.secrets import PullSecrets
from vk_provider.kube.session import KubeError
from vk_provider.oci import Credentials, ErrorReason, Platform, RegistryClient, RegistryError
from vk_provider.oci.client import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    UNCOMPRESSED_SIZE_ANNOTATION,
    parse_challenge,
)
from vk_provider.oci.credentials import lookup, parse_docker_config, registry_key

# ---------------------------------------------------------------- a registry in the test process


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob(label: str) -> str:
    return sha(label.encode())


def config_blob(os: str = "linux", arch: str = "amd64") -> bytes:
    return json.dumps({"os": os, "architecture": arch, "rootfs": {"type": "layers", "diff_ids": []}}).encode()


def image_manifest(layers: Sequence[tuple[str, int]], config: bytes, media_type: str = OCI_MANIFEST) -> bytes:
    layer_type = (
        "application/vnd.oci.image.layer.v1.tar+gzip"
        if media_type == OCI_MANIFEST
        else "application/vnd.docker.image.rootfs.diff.tar.gzip"
    )
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(config),
                "size": len(config),
            },
            "layers": [{"mediaType": layer_type, "digest": digest, "size": size} for digest, size in layers],
        }
    ).encode()


def index(entries: Sequence[tuple[bytes, str, str, str]], media_type: str = OCI_INDEX) -> bytes:
    manifests = []
    for body, os, arch, variant in entries:
        platform = {"os": os, "architecture": arch} | ({"variant": variant} if variant else {})
        manifests.append({"mediaType": OCI_MANIFEST, "digest": sha(body), "size": len(body), "platform": platform})
    return json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests}).encode()


@dataclass
class FakeRegistry:
    """Distribution API subset: manifests by tag or digest, blobs, and bearer or basic auth."""

    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    auth: str = ""  # "", "bearer" or "basic"
    users: dict[str, str] = field(default_factory=dict)
    anonymous_tokens: bool = True
    token_seconds: int = 300
    digest_header: str | None = None  # override Docker-Content-Digest
    blob_redirect: str = ""  # base URL blobs are redirected to
    stream_manifests: bool = False  # chunked, without Content-Length
    hold: asyncio.Event | None = None  # manifests wait for it (timeouts)
    requests: list[web.Request] = field(default_factory=list)
    token_requests: list[web.Request] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    url: str = ""

    def push(self, repository: str, reference: str, media_type: str, body: bytes) -> str:
        self.manifests[(repository, reference)] = (media_type, body)
        self.manifests[(repository, sha(body))] = (media_type, body)
        return sha(body)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self.token)
        app.router.add_get("/v2/{repository:.+}/manifests/{reference}", self.manifest)
        app.router.add_get("/v2/{repository:.+}/blobs/{digest}", self.blob)
        return app

    def _user(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.users.get(user) == password else None

    def _denied(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        if self.auth == "bearer" and header.removeprefix("Bearer ") not in self.issued:
            repository = request.match_info["repository"]
            challenge = f'Bearer realm="{self.url}/token",service="fake",scope="repository:{repository}:pull"'
            return _error(401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": challenge})
        if self.auth == "basic" and self._user(request) is None:
            return _error(401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": 'Basic realm="fake"'})
        return None

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests.append(request)
        if "Authorization" in request.headers and self._user(request) is None:
            return web.json_response({"details": "incorrect username or password"}, status=401)
        if "Authorization" not in request.headers and not self.anonymous_tokens:
            return web.json_response({"details": "anonymous access denied"}, status=401)
        value = f"token-{len(self.issued)}-{request.query.get('scope', '')}"
        self.issued.append(value)
        return web.json_response({"token": value, "expires_in": self.token_seconds})

    async def manifest(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request)
        denied = self._denied(request)
        if denied is not None:
            return denied
        if self.hold is not None:
            await self.hold.wait()
        key = (request.match_info["repository"], request.match_info["reference"])
        if key not in self.manifests:
            return _error(404, "MANIFEST_UNKNOWN", "manifest unknown")
        media_type, body = self.manifests[key]
        headers = {"Docker-Content-Digest": self.digest_header or sha(body), "Content-Type": media_type}
        if not self.stream_manifests:
            return web.Response(body=body, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 1000):
            await response.write(body[start : start + 1000])
        await response.write_eof()
        return response

    async def blob(self, request: web.Request) -> web.Response:
        self.requests.append(request)
        denied = self._denied(request) if not request.query.get("signed") else None
        if denied is not None:
            return denied
        digest = request.match_info["digest"]
        if self.blob_redirect and not request.query.get("signed"):
            raise web.HTTPTemporaryRedirect(
                f"{self.blob_redirect}/v2/{request.match_info['repository']}/blobs/{digest}?signed=1"
            )
        if digest not in self.blobs:
            return _error(404, "BLOB_UNKNOWN", "blob unknown")
        return web.Response(body=self.blobs[digest], content_type="application/octet-stream")


def _error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    body = json.dumps({"errors": [{"code": code, "message": message}]})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def registry() -> AsyncIterator[FakeRegistry]:
    fake = FakeRegistry()
    runner, fake.url = await serve(fake.app())
    try:
        yield fake
    finally:
        if fake.hold is not None:
            fake.hold.set()
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[RegistryClient]:
    async with RegistryClient(timeout=5.0) as c:
        yield c


def ref_for(registry: FakeRegistry, path: str) -> ImageRef:
    parsed = parse_reference(f"{registry.url.removeprefix('http://')}/{path}")
    assert isinstance(parsed, ImageRef)
    return parsed


AMD64_LAYERS = [(blob("amd64 base"), 30_000_000), (blob("amd64 app"), 5_000_000)]
ARM64_LAYERS = [(blob("arm64 base"), 28_000_000), (blob("arm64 app"), 4_000_000), (blob("arm64 extra"), 1_000)]


def push_multi_platform(registry: FakeRegistry, media_type: str = OCI_INDEX) -> str:
    amd64 = image_manifest(AMD64_LAYERS, config_blob("linux", "amd64"))
    arm64 = image_manifest(ARM64_LAYERS, config_blob("linux", "arm64"))
    registry.push("team/app", sha(amd64), OCI_MANIFEST, amd64)
    registry.push("team/app", sha(arm64), OCI_MANIFEST, arm64)
    attestation = image_manifest([(blob("attestation"), 10)], b"{}")
    registry.push("team/app", sha(attestation), OCI_MANIFEST, attestation)
    top = index(
        [(amd64, "linux", "amd64", ""), (arm64, "linux", "arm64", "v8"), (attestation, "unknown", "unknown", "")],
        media_type,
    )
    return registry.push("team/app", "1.0", media_type, top)


# ---------------------------------------------------------------- indexes and platforms


@pytest.mark.parametrize("index_type", [OCI_INDEX, DOCKER_MANIFEST_LIST])
@pytest.mark.parametrize(
    ("platform", "expected"),
    [
        (Platform("linux", "amd64"), AMD64_LAYERS),
        (Platform("linux", "arm64"), ARM64_LAYERS),
        (Platform("linux", "arm64", "v8"), ARM64_LAYERS),
    ],
)
async def test_an_index_resolves_to_the_nodes_platform(
    registry: FakeRegistry, index_type: str, platform: Platform, expected: list[tuple[str, int]]
) -> None:
    top_digest = push_multi_platform(registry, index_type)
    async with RegistryClient(platform=platform) as client:
        found = await client.resolve(ref_for(registry, "team/app:1.0"))
    assert isinstance(found, ImageManifest), found
    assert [(layer.digest, layer.size) for layer in found.layers] == expected
    assert found.digest == top_digest  # what the tag names, as `docker pull` prints it
    assert found.source == "registry"
    assert found.reference == ref_for(registry, "team/app:1.0").normalized
    # An index names its platforms: no config blob is read.
    assert not any("/blobs/" in request.path for request in registry.requests)


async def test_no_entry_for_the_platform_is_an_error_naming_what_is_offered(registry: FakeRegistry) -> None:
    push_multi_platform(registry)
    async with RegistryClient(platform=Platform("linux", "s390x")) as client:
        found = await client.resolve(ref_for(registry, "team/app:1.0"))
    assert isinstance(found, RegistryError)
    assert found.reason is ErrorReason.NO_PLATFORM
    assert "linux/s390x" in found.message
    assert "linux/amd64" in found.message
    assert "linux/arm64/v8" in found.message


async def test_an_image_pinned_by_digest_is_fetched_by_digest(registry: FakeRegistry, client: RegistryClient) -> None:
    top_digest = push_multi_platform(registry)
    found = await client.resolve(ref_for(registry, f"team/app@{top_digest}"))
    assert isinstance(found, ImageManifest), found
    assert found.digest == top_digest
    assert registry.requests[0].match_info["reference"] == top_digest


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
async def test_a_plain_manifest_is_checked_against_its_config(registry: FakeRegistry, media_type: str) -> None:
    good, foreign = config_blob("linux", "amd64"), config_blob("linux", "arm64")
    registry.blobs = {sha(good): good, sha(foreign): foreign}
    registry.push("single", "ok", media_type, image_manifest(AMD64_LAYERS, good, media_type))
    registry.push("single", "arm", media_type, image_manifest(ARM64_LAYERS, foreign, media_type))
    async with RegistryClient() as client:
        ok = await client.resolve(ref_for(registry, "single:ok"))
        arm = await client.resolve(ref_for(registry, "single:arm"))
    assert isinstance(ok, ImageManifest), ok
    assert [layer.size for layer in ok.layers] == [size for _, size in AMD64_LAYERS]
    assert isinstance(arm, RegistryError)
    assert arm.reason is ErrorReason.NO_PLATFORM
    assert "linux/arm64" in arm.message


async def test_the_config_is_not_read_when_platform_checks_are_off(registry: FakeRegistry) -> None:
    registry.push("single", "arm", OCI_MANIFEST, image_manifest(ARM64_LAYERS, config_blob("linux", "arm64")))
    async with RegistryClient(verify_platform=False) as client:
        found = await client.resolve(ref_for(registry, "single:arm"))
    assert isinstance(found, ImageManifest), found
    assert [request.path for request in registry.requests] == ["/v2/single/manifests/arm"]


async def test_uncompressed_sizes_come_from_annotations_the_media_type_or_an_estimate(
    registry: FakeRegistry,
) -> None:
    config = config_blob()
    registry.blobs[sha(config)] = config
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"digest": sha(config), "size": len(config)},
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": blob("a"),
                    "size": 1000,
                    "annotations": {UNCOMPRESSED_SIZE_ANNOTATION: "4321"},
                },
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blob("b"), "size": 700},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": blob("c"), "size": 1000},
            ],
        }
    ).encode()
    registry.push("sizes", "1", OCI_MANIFEST, body)
    async with RegistryClient(uncompressed_ratio=2.5) as client:
        found = await client.resolve(ref_for(registry, "sizes:1"))
    assert isinstance(found, ImageManifest), found
    assert [layer.uncompressed_size for layer in found.layers] == [4321, 700, 2500]


# ---------------------------------------------------------------- authentication


async def test_anonymous_bearer_tokens_are_fetched_once_and_reused(registry: FakeRegistry) -> None:
    registry.auth = "bearer"
    push_multi_platform(registry)
    registry.push("team/app", "2.0", *registry.manifests[("team/app", "1.0")])
    async with RegistryClient() as client:
        first = await client.resolve(ref_for(registry, "team/app:1.0"))
        second = await client.resolve(ref_for(registry, "team/app:2.0"))
    assert isinstance(first, ImageManifest), first
    assert isinstance(second, ImageManifest), second
    assert len(registry.token_requests) == 1
    token_request = registry.token_requests[0]
    assert token_request.query["scope"] == "repository:team/app:pull"
    assert token_request.query["service"] == "fake"
    assert "Authorization" not in token_request.headers
    # 401, then index + platform manifest with the token, then both again without a 401.
    assert [r.headers.get("Authorization", "") for r in registry.requests][1:] == [f"Bearer {registry.issued[0]}"] * 4


async def test_an_expired_token_is_renewed(registry: FakeRegistry) -> None:
    registry.auth = "bearer"
    push_multi_platform(registry)
    async with RegistryClient() as client:
        assert isinstance(await client.resolve(ref_for(registry, "team/app:1.0")), ImageManifest)
        # Token lifetimes run on the loop's clock; age every cached token past its expiry.
        loop_now = asyncio.get_running_loop().time()
        client._tokens = {key: replace(token, expires_at=loop_now - 1) for key, token in client._tokens.items()}
        assert isinstance(await client.resolve(ref_for(registry, "team/app:1.0")), ImageManifest)
    assert len(registry.token_requests) == 2


async def test_bearer_tokens_with_credentials_from_a_pull_secret(registry: FakeRegistry) -> None:
    registry.auth = "bearer"
    registry.anonymous_tokens = False
    registry.users = {"alice": "s3cret"}
    push_multi_platform(registry)
    async with RegistryClient() as client:
        anonymous = await client.resolve(ref_for(registry, "team/app:1.0"))
        wrong = await client.resolve(ref_for(registry, "team/app:1.0"), Credentials("alice", "nope"))
        right = await client.resolve(ref_for(registry, "team/app:1.0"), Credentials("alice", "s3cret"))
    assert isinstance(anonymous, RegistryError)
    assert anonymous.reason is ErrorReason.UNAUTHORIZED
    assert "anonymous access" in anonymous.message
    assert isinstance(wrong, RegistryError)
    assert wrong.reason is ErrorReason.UNAUTHORIZED
    assert "user alice" in wrong.message
    assert "nope" not in wrong.message
    assert isinstance(right, ImageManifest), right
    assert registry.token_requests[-1].headers["Authorization"] == "Basic " + base64.b64encode(b"alice:s3cret").decode()


async def test_basic_auth(registry: FakeRegistry) -> None:
    registry.auth = "basic"
    registry.users = {"bob": "pw"}
    push_multi_platform(registry)
    async with RegistryClient() as client:
        without = await client.resolve(ref_for(registry, "team/app:1.0"))
        with_credentials = await client.resolve(ref_for(registry, "team/app:1.0"), Credentials("bob", "pw"))
    assert isinstance(without, RegistryError)
    assert without.reason is ErrorReason.UNAUTHORIZED
    assert "requires credentials" in without.message
    assert isinstance(with_credentials, ImageManifest), with_credentials
    assert registry.token_requests == []


async def test_a_redirect_to_another_origin_does_not_carry_the_credentials(registry: FakeRegistry) -> None:
    storage = FakeRegistry()
    config = config_blob()
    storage.blobs[sha(config)] = config
    runner, storage.url = await serve(storage.app())
    try:
        registry.auth = "basic"
        registry.users = {"bob": "pw"}
        registry.blob_redirect = storage.url.replace("127.0.0.1", "localhost")
        registry.push("single", "1", OCI_MANIFEST, image_manifest(AMD64_LAYERS, config))
        async with RegistryClient() as client:
            found = await client.resolve(ref_for(registry, "single:1"), Credentials("bob", "pw"))
    finally:
        await runner.cleanup()
    assert isinstance(found, ImageManifest), found
    assert [request.path for request in storage.requests] == [f"/v2/single/blobs/{sha(config)}"]
    assert "Authorization" not in storage.requests[0].headers


@pytest.mark.parametrize(
    ("header", "scheme", "params"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull"',
            "bearer",
            {"realm": "https://auth.docker.io/token", "service": "registry.docker.io", "scope": "repository:a/b:pull"},
        ),
        (
            'Bearer realm="https://r/t",scope="repository:a:pull,push"',
            "bearer",
            {"realm": "https://r/t", "scope": "repository:a:pull,push"},
        ),
        ('Basic realm="Registry Realm"', "basic", {"realm": "Registry Realm"}),
        ("bearer realm=https://r/t", "bearer", {"realm": "https://r/t"}),
    ],
)
def test_parse_challenge(header: str, scheme: str, params: dict[str, str]) -> None:
    parsed = parse_challenge(header)
    assert parsed is not None
    assert parsed.scheme == scheme
    assert dict(parsed.params) == params


def test_parse_challenge_of_nothing() -> None:
    assert parse_challenge("") is None


# ---------------------------------------------------------------- failures


async def test_an_unknown_tag_is_manifest_unknown(registry: FakeRegistry, client: RegistryClient) -> None:
    found = await client.resolve(ref_for(registry, "team/app:missing"))
    assert isinstance(found, RegistryError)
    assert found.reason is ErrorReason.NOT_FOUND
    assert "tag missing not found" in found.message
    assert "MANIFEST_UNKNOWN" in found.message


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
async def test_an_oversized_manifest_is_refused(registry: FakeRegistry, streamed: bool) -> None:
    registry.stream_manifests = streamed
    layers = [(blob(f"layer {n}"), n + 1) for n in range(200)]
    registry.push("big", "1", OCI_MANIFEST, image_manifest(layers, config_blob()))
    async with RegistryClient(max_manifest_bytes=4096) as client:
        found = await client.resolve(ref_for(registry, "big:1"))
    assert isinstance(found, RegistryError)
    assert found.reason is ErrorReason.TOO_LARGE
    assert "4096" in found.message


async def test_a_body_that_does_not_match_its_digest_is_refused(registry: FakeRegistry, client: RegistryClient) -> None:
    push_multi_platform(registry)
    registry.digest_header = blob("something else")
    found = await client.resolve(ref_for(registry, "team/app:1.0"))
    assert isinstance(found, RegistryError)
    assert found.reason is ErrorReason.INVALID
    assert "differs" in found.message


@pytest.mark.parametrize(
    ("body", "reason", "words"),
    [
        (b"not json", ErrorReason.INVALID, "not JSON"),
        (b'{"schemaVersion": 1, "fsLayers": []}', ErrorReason.UNSUPPORTED, "schema 1"),
        (b'{"schemaVersion": 2, "mediaType": "text/plain"}', ErrorReason.UNSUPPORTED, "text/plain"),
        (
            b'{"schemaVersion": 2, "mediaType": "' + OCI_MANIFEST.encode() + b'", "layers": [{"digest": "x"}]}',
            ErrorReason.INVALID,
            "layers[0]",
        ),
    ],
)
async def test_malformed_manifests(
    registry: FakeRegistry, client: RegistryClient, body: bytes, reason: ErrorReason, words: str
) -> None:
    registry.push("odd", "1", "application/octet-stream", body)
    found = await client.resolve(ref_for(registry, "odd:1"))
    assert isinstance(found, RegistryError)
    assert found.reason is reason
    assert words in found.message


async def test_an_unreachable_registry() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ref = parse_reference(f"127.0.0.1:{port}/app:1")
    assert isinstance(ref, ImageRef)
    async with RegistryClient() as client:
        found = await client.resolve(ref)
    assert isinstance(found, RegistryError)
    assert found.reason is ErrorReason.UNREACHABLE
    assert f"127.0.0.1:{port}" in found.message


async def test_a_registry_that_does_not_answer_in_time(registry: FakeRegistry) -> None:
    push_multi_platform(registry)
    registry.hold = asyncio.Event()
    async with RegistryClient(timeout=0.2) as client:
        found = await client.resolve(ref_for(registry, "team/app:1.0"))
    assert isinstance(found, RegistryError)
    assert found.reason is ErrorReason.TIMEOUT


@pytest.mark.parametrize(
    ("registry_host", "insecure", "url"),
    [
        ("docker.io", (), "https://registry-1.docker.io"),
        ("registry.example.com", (), "https://registry.example.com"),
        ("localhost", (), "http://localhost"),
        ("localhost:5000", (), "http://localhost:5000"),
        ("127.0.0.1:5000", (), "http://127.0.0.1:5000"),
        ("[::1]:5000", (), "http://[::1]:5000"),
        ("registry.lan:5000", ("registry.lan:5000",), "http://registry.lan:5000"),
        ("registry.lan:5000", ("registry.lan",), "http://registry.lan:5000"),
        ("registry.lan:5000", ("http://registry.lan:5000/",), "http://registry.lan:5000"),
        ("registry.lan:5000", ("registry.lan:6000",), "https://registry.lan:5000"),
    ],
)
def test_http_or_https(registry_host: str, insecure: tuple[str, ...], url: str) -> None:
    assert RegistryClient(insecure_registries=insecure).base_url(registry_host) == url


# ---------------------------------------------------------------- credentials


def encoded(document: Any) -> str:
    return base64.b64encode(json.dumps(document).encode()).decode()


def auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("secret_type", "data", "expected"),
    [
        (
            "kubernetes.io/dockerconfigjson",
            {".dockerconfigjson": encoded({"auths": {"https://index.docker.io/v1/": {"auth": auth("u", "p:w")}}})},
            {"docker.io": Credentials("u", "p:w")},
        ),
        (
            "kubernetes.io/dockerconfigjson",
            {".dockerconfigjson": encoded({"auths": {"Reg.Example.com:5000": {"username": "a", "password": "b"}}})},
            {"reg.example.com:5000": Credentials("a", "b")},
        ),
        (
            "kubernetes.io/dockercfg",
            {".dockercfg": encoded({"http://10.0.0.1:5000/v2/": {"auth": auth("c", "d")}})},
            {"10.0.0.1:5000": Credentials("c", "d")},
        ),
        (
            "kubernetes.io/dockerconfigjson",
            {".dockerconfigjson": encoded({"auths": {"r.io": {"identitytoken": "t"}, "s.io": {"auth": "!!"}}})},
            {},
        ),
        ("Opaque", {".dockerconfigjson": encoded({"auths": {}})}, "type Opaque"),
        ("kubernetes.io/dockerconfigjson", {}, "has no .dockerconfigjson"),
        ("kubernetes.io/dockerconfigjson", {".dockerconfigjson": "not base64!"}, "not base64-encoded JSON"),
        ("kubernetes.io/dockerconfigjson", {".dockerconfigjson": encoded([1])}, "no registry entries"),
    ],
)
def test_parse_docker_config(secret_type: str, data: dict[str, str], expected: object) -> None:
    found = parse_docker_config(secret_type, data)
    if isinstance(expected, str):
        assert isinstance(found, str)
        assert expected in found
    else:
        assert found == expected


def test_credentials_never_show_the_password() -> None:
    assert "hunter2" not in repr(Credentials("me", "hunter2"))


@pytest.mark.parametrize(
    ("host", "keys", "expected"),
    [
        ("docker.io", {"docker.io": "hub"}, "hub"),
        ("reg.io:5000", {"reg.io:5000": "exact", "reg.io": "any port"}, "exact"),
        ("reg.io:5000", {"reg.io": "any port"}, "any port"),
        ("reg.io:5000", {"reg.io:6000": "other port"}, None),
        ("a.reg.io", {"*.reg.io": "wild"}, "wild"),
        ("a.b.reg.io", {"*.reg.io": "wild"}, None),
        ("other.io", {"reg.io": "x"}, None),
    ],
)
def test_credentials_lookup(host: str, keys: dict[str, str], expected: str | None) -> None:
    table = {key: Credentials(value, "pw") for key, value in keys.items()}
    found = lookup(host, table)
    assert (found.username if found else None) == expected


def test_registry_key() -> None:
    assert registry_key("https://index.docker.io/v1/") == "docker.io"
    assert registry_key("HTTP://Host:5000/path") == "host:5000"


class FakeSession:
    def __init__(self, secrets: dict[str, dict[str, Any]], fail: set[str] | None = None) -> None:
        self.secrets = secrets
        self.fail = fail or set()
        self.paths: list[str] = []

    async def request(self, method: str, path: str, **_: Any) -> dict[str, Any]:
        self.paths.append(path)
        name = path.rsplit("/", 1)[1]
        if name in self.fail:
            raise KubeError(403, "Forbidden", "secrets is forbidden")
        if name not in self.secrets:
            raise KubeError(404, "NotFound", f'secrets "{name}" not found')
        return self.secrets[name]


async def test_pull_secrets_are_read_from_the_pods_namespace(caplog: pytest.LogCaptureFixture) -> None:
    first = {
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": encoded({"auths": {"reg.io": {"auth": auth("first", "1")}}})},
    }
    second = {
        "type": "kubernetes.io/dockerconfigjson",
        "data": {
            ".dockerconfigjson": encoded(
                {"auths": {"reg.io": {"auth": auth("second", "2")}, "other.io": {"auth": auth("o", "3")}}}
            )
        },
    }
    opaque = {"type": "Opaque", "data": {}}
    session = FakeSession({"first": first, "second": second, "opaque": opaque}, fail={"forbidden"})
    secrets = PullSecrets(session)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        found = await secrets.credentials("team", ["first", "missing", "second", "opaque", "forbidden"])
    assert found == {"reg.io": Credentials("first", "1"), "other.io": Credentials("o", "3")}
    assert session.paths[0] == "/api/v1/namespaces/team/secrets/first"
    assert "team/missing not found" in caplog.text
    assert "team/opaque is not usable" in caplog.text
    assert "team/forbidden" in caplog.text


# ---------------------------------------------------------------- the image service with a registry


def manifest(reference: str, *sizes: int) -> ImageManifest:
    layers = tuple(Layer(blob(f"{reference} {n}"), size, size * 2) for n, size in enumerate(sizes))
    return ImageManifest(reference, blob(reference), layers, source="registry")


@dataclass
class FakeResolver:
    manifests: dict[str, ImageManifest] = field(default_factory=dict)
    calls: list[tuple[str, Credentials | None]] = field(default_factory=list)
    gate: asyncio.Event | None = None
    closed: bool = False
    called: asyncio.Event = field(default_factory=asyncio.Event)

    async def resolve(self, ref: ImageRef, credentials: Credentials | None = None) -> ImageManifest | RegistryError:
        self.calls.append((ref.normalized, credentials))
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        found = self.manifests.get(ref.normalized)
        if found is None:
            return RegistryError(ErrorReason.NOT_FOUND, f"{ref.normalized}: tag not found")
        return found

    async def close(self) -> None:
        self.closed = True

    async def wait_for_calls(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.calls) < count:
                self.called.clear()
                await self.called.wait()


@dataclass
class FakeStore:
    saved: dict[str, ImageManifest] = field(default_factory=dict)
    saves: list[str] = field(default_factory=list)  # the references asked to be saved, in order

    async def save_manifest(self, manifest: ImageManifest, *, replace: bool = True) -> None:
        self.saves.append(manifest.reference)
        if replace or manifest.reference not in self.saved:
            self.saved[manifest.reference] = manifest

    async def get_manifest(self, reference: str) -> ImageManifest | None:
        return self.saved.get(reference)


@dataclass
class FakeCredentials:
    table: dict[str, Credentials]
    asked: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    async def credentials(self, namespace: str, names: Sequence[str]) -> Mapping[str, Credentials]:
        self.asked.append((namespace, tuple(names)))
        return self.table


FAST = replace(PullSettings(), time_scale=1e6, jitter=0.0)
APP = "reg.example.com/team/app:1"
TOOL = "reg.example.com/team/tool:2"


def pod(*images: str, secrets: tuple[str, ...] = ()) -> PodFacts:
    return PodFacts(
        uid="u1",
        namespace="team",
        name="p",
        node_name="vk",
        created=None,
        restart_policy="Always",
        grace_seconds=30,
        containers=tuple(ContainerSpec(f"c{n}", image, "IfNotPresent") for n, image in enumerate(images)),
        pull_secrets=secrets,
    )


def service(resolver: FakeResolver, store: FakeStore, creds: FakeCredentials | None = None) -> CatalogImages:
    return CatalogImages(
        Catalog(),
        Puller(FAST, random.Random(1)),
        unknown="registry",
        resolver=resolver,
        store=store,
        credentials=creds,
    )


async def test_unknown_images_are_resolved_in_parallel_stored_and_planned() -> None:
    resolver = FakeResolver({APP: manifest(APP, 100, 200), TOOL: manifest(TOOL, 50)}, gate=asyncio.Event())
    store = FakeStore()
    creds = FakeCredentials({"reg.example.com": Credentials("u", "p")})
    images = service(resolver, store, creds)
    planning = asyncio.create_task(images.for_pod(pod(APP, TOOL, APP, secrets=("regcred",)), CacheDecision()))
    await resolver.wait_for_calls(2)  # both reads in flight at once, not one after the other
    assert not planning.done()
    resolver.gate.set()  # type: ignore[union-attr]
    planned = await planning
    assert sorted(resolver.calls) == [(APP, Credentials("u", "p")), (TOOL, Credentials("u", "p"))]
    assert creds.asked == [("team", ("regcred",))]
    assert planned.plan.bytes_to_fetch == 350
    assert set(store.saved) == {APP, TOOL}
    assert images.manifest(APP) == manifest(APP, 100, 200)
    result = await planned.pull(pod(APP).containers[0])
    assert result.downloaded == 300
    assert result.size == 300


async def test_a_stored_manifest_is_reused_without_the_registry() -> None:
    store = FakeStore({APP: manifest(APP, 7, 8)})
    resolver = FakeResolver()
    planned = await service(resolver, store).for_pod(pod(APP), CacheDecision())
    assert resolver.calls == []
    assert planned.plan.bytes_to_fetch == 15


async def test_a_stored_synthetic_manifest_is_not_taken_for_the_registrys() -> None:
    store = FakeStore({APP: replace(manifest(APP, 7), source="synthetic")})
    resolver = FakeResolver({APP: manifest(APP, 100)})
    planned = await service(resolver, store).for_pod(pod(APP), CacheDecision())
    assert [call[0] for call in resolver.calls] == [APP]
    assert planned.plan.bytes_to_fetch == 100


async def test_catalog_and_synthetic_manifests_used_are_stored_once_without_replacing_a_registrys() -> None:
    catalogued = manifest("docker.io/library/nginx:1.7.9", 30, 40)
    fetched = manifest(TOOL, 9)  # read from its registry by an earlier run, now also a synthetic image here
    store = FakeStore({TOOL: fetched})
    images = CatalogImages(
        Catalog({catalogued.reference: catalogued}), Puller(FAST, random.Random(1)), unknown="synthetic", store=store
    )
    writer = asyncio.create_task(images.run())
    try:
        for _ in range(3):  # three Pods: each image stored once
            await images.for_pod(pod("nginx:1.7.9", APP, TOOL), CacheDecision())
        await await_for(lambda: _at_least(store.saves, 3), timeout=5, what="three manifests stored")
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    assert sorted(store.saves) == sorted([catalogued.reference, APP, TOOL])
    assert store.saved[catalogued.reference] == catalogued
    assert store.saved[APP].source == "synthetic"
    assert store.saved[TOOL] == fetched  # the registry's manifest stays


@pytest.mark.parametrize("unknown", ["fail", "registry"])
async def test_an_unknown_image_never_pulled_is_err_image_never_pull_not_a_pull(unknown: UnknownImages) -> None:
    resolver = FakeResolver({APP: manifest(APP, 10)})
    images = CatalogImages(
        Catalog(),
        Puller(FAST, random.Random(1)),
        unknown=unknown,
        resolver=resolver,
        store=FakeStore(),
    )
    never = replace(pod(APP), containers=(ContainerSpec("c0", APP, "Never"),))
    planned = await images.for_pod(never, CacheDecision())
    assert not planned.will_pull(never.containers[0])  # no Pulling Event
    with pytest.raises(ImagePullError) as caught:
        await planned.pull(never.containers[0])
    assert caught.value.reason == "ErrImageNeverPull"
    assert caught.value.message == f'Container image "{APP}" is not present with pull policy of Never'
    assert not caught.value.retry
    assert resolver.calls == []  # the registry is never asked


async def _at_least(items: Sequence[object], count: int) -> bool:
    return len(items) >= count


async def test_pods_wanting_the_same_image_share_one_registry_read() -> None:
    resolver = FakeResolver({APP: manifest(APP, 10)}, gate=asyncio.Event())
    images = service(resolver, FakeStore())
    pods = [asyncio.create_task(images.for_pod(pod(APP), CacheDecision())) for _ in range(5)]
    await resolver.wait_for_calls(1)
    resolver.gate.set()  # type: ignore[union-attr]
    plans = await asyncio.gather(*pods)
    assert len(resolver.calls) == 1
    assert all(plan.plan.bytes_to_fetch == 10 for plan in plans)


async def test_a_registry_failure_is_err_image_pull_and_is_retried_on_the_next_attempt() -> None:
    resolver = FakeResolver({TOOL: manifest(TOOL, 5)})
    images = service(resolver, FakeStore())
    planned = await images.for_pod(pod(TOOL, APP), CacheDecision())
    tool, app = pod(TOOL, APP).containers
    assert (await planned.pull(tool)).downloaded == 5
    assert planned.will_pull(app)
    with pytest.raises(ImagePullError) as first:
        await planned.pull(app)
    assert first.value.reason == "ErrImagePull"
    assert first.value.retry
    assert f'failed to resolve reference "{APP}"' in first.value.message
    assert len(resolver.calls) == 2  # the first attempt reports what planning found
    with pytest.raises(ImagePullError):
        await planned.pull(app)
    assert len(resolver.calls) == 3
    # Resolvable now; its layer shared with the tool image is present already.
    shared = manifest(TOOL, 5).layers[0]
    resolver.manifests[APP] = replace(manifest(APP, 40), layers=(shared, *manifest(APP, 40).layers))
    result = await planned.pull(app)
    assert result.downloaded == 40
    assert result.size == 45
    assert len(resolver.calls) == 4


async def test_close_closes_the_resolver() -> None:
    resolver = FakeResolver()
    await service(resolver, FakeStore()).close()
    assert resolver.closed


def test_registry_mode_needs_a_resolver() -> None:
    with pytest.raises(ValueError, match="ManifestResolver"):
        CatalogImages(Catalog(), Puller(FAST, random.Random(1)), unknown="registry")


async def test_an_image_read_with_credentials_is_reused_only_with_the_same_credentials() -> None:
    resolver = FakeResolver({APP: manifest(APP, 10)})
    creds = FakeCredentials({"reg.example.com": Credentials("u", "p")})
    images = service(resolver, FakeStore(), creds)
    await images.for_pod(pod(APP, secrets=("regcred",)), CacheDecision())
    await images.for_pod(pod(APP, secrets=("regcred",)), CacheDecision())
    assert resolver.calls == [(APP, Credentials("u", "p"))]
    await images.for_pod(pod(APP), CacheDecision())  # no Secret: it must ask the registry itself
    assert resolver.calls == [(APP, Credentials("u", "p")), (APP, None)]
    # Read anonymously, it is public: every Pod may use it from now on.
    await images.for_pod(pod(APP, secrets=("regcred",)), CacheDecision())
    assert len(resolver.calls) == 2
