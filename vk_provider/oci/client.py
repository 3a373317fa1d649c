"""A read-only client of the OCI Distribution API: an image reference → its layers for one platform.

Owns the HTTP conversation with a registry (``GET /v2/<repository>/manifests/<tag|digest>``, and a
config blob when it is needed), its authentication (anonymous or basic-credential bearer tokens,
cached until they expire, and HTTP Basic) and the choice of http or https. It turns what it reads
into an :class:`~vk_provider.domain.model.ImageManifest` with ``source="registry"``.

What it reads, and what it estimates:

- image indexes (OCI) and manifest lists (Docker) are resolved to the entry for the node's
  platform (``os/architecture[/variant]``); a plain manifest's platform is checked against its
  config blob, the only time a blob is read;
- a layer's compressed size is exact (the manifest's descriptor);
- a layer's UNCOMPRESSED size is not in a manifest. It is read from the eStargz annotation
  ``io.containers.estargz.uncompressed-size`` when a layer has it, equals the compressed size for
  an uncompressed tar layer, and is otherwise ESTIMATED as compressed * ``uncompressed_ratio``
  (2.5: typical gzip ratio of distribution root file systems; the catalog's python:3.12 is 2.65);
- the manifest digest is the digest of what the reference names (the index for a multi-platform
  tag, as ``docker pull`` prints it): ``Docker-Content-Digest`` checked against the SHA-256 of
  the body, or that SHA-256.

Failures come back as :class:`RegistryError` values from :meth:`RegistryClient.resolve`; it never
raises for a registry's answers or the network. The client owns its ``aiohttp.ClientSession``:
``close`` must be awaited once. It never logs or returns a password or a token.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp

from vk_provider import __version__
from vk_provider.domain.images import ImageRef
from vk_provider.domain.model import ImageManifest, Layer
from vk_provider.oci.credentials import Credentials, registry_key

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
_SCHEMA1_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
_UNCOMPRESSED_LAYER_TYPES = frozenset(
    {"application/vnd.oci.image.layer.v1.tar", "application/vnd.docker.image.rootfs.diff.tar"}
)
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
UNCOMPRESSED_RATIO = 2.5
# containerd and distribution refuse manifests above 4 MiB; a bigger one is an attack or a mistake.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_MAX_ERROR_BODY_BYTES = 64 * 1024
_MAX_REDIRECTS = 5
# A token is renewed this long before it expires, so a request never carries one that lapses on the way.
_TOKEN_MARGIN_SECONDS = 10.0
# The Distribution token spec's default when a token server omits expires_in.
_DEFAULT_TOKEN_SECONDS = 60.0
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64"}
_CHALLENGE_PARAM = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')

JSON = dict[str, Any]


class ErrorReason(enum.StrEnum):
    NOT_FOUND = "ManifestUnknown"
    UNAUTHORIZED = "Unauthorized"
    UNREACHABLE = "Unreachable"
    TIMEOUT = "Timeout"
    TOO_LARGE = "ManifestTooLarge"
    INVALID = "InvalidManifest"
    UNSUPPORTED = "UnsupportedManifest"
    NO_PLATFORM = "NoMatchingPlatform"
    TOO_MANY_REQUESTS = "TooManyRequests"
    HTTP = "RegistryError"


@dataclass(frozen=True, slots=True)
class RegistryError:
    """Why an image could not be resolved; ``message`` names the image and is fit to show a user."""

    reason: ErrorReason
    message: str

    def __str__(self) -> str:
        return self.message


class RegistryFailure(Exception):
    """Carries a :class:`RegistryError` out of the client's internals; never escapes ``resolve``."""

    def __init__(self, error: RegistryError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True, slots=True)
class Platform:
    """The platform whose image an index resolves to; ``variant`` empty: any variant."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)

    def matches(self, os: str, architecture: str, variant: str = "") -> bool:
        if os != self.os or _ARCH_ALIASES.get(architecture, architecture) != self.architecture:
            return False
        if not self.variant:
            return True
        # arm64 images usually leave out their (only) variant, v8.
        return variant == self.variant or (not variant and self.architecture == "arm64" and self.variant == "v8")


@dataclass(frozen=True, slots=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` header: ``scheme`` (lower case) and its parameters."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)


def parse_challenge(header: str) -> Challenge | None:
    """``Bearer realm="…",service="…",scope="…"`` or ``Basic realm="…"``; None if unparseable."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params: dict[str, str] = {}
    for key, value in _CHALLENGE_PARAM.findall(rest):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[key.lower()] = value
    return Challenge(scheme.lower(), params)


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    headers: Mapping[str, str]  # case-insensitive (aiohttp's CIMultiDictProxy)
    body: bytes


class RegistryClient:
    """Resolves image references against registries. Safe to use from many tasks at once."""

    def __init__(
        self,
        *,
        platform: Platform | None = None,
        insecure_registries: Iterable[str] = (),
        timeout: float = 30.0,
        max_manifest_bytes: int = MAX_MANIFEST_BYTES,
        uncompressed_ratio: float = UNCOMPRESSED_RATIO,
        verify_platform: bool = True,
    ) -> None:
        self.platform = platform or Platform()
        self.insecure_registries = frozenset(registry_key(name) for name in insecure_registries if name.strip())
        self.timeout = timeout
        self.max_manifest_bytes = max_manifest_bytes
        self.uncompressed_ratio = uncompressed_ratio
        self.verify_platform = verify_platform
        # Requests sent (token requests included): lets tests and metrics see that a stored
        # manifest was reused without contacting the registry.
        self.requests = 0
        self._session: aiohttp.ClientSession | None = None
        self._tokens: dict[tuple[str, str, str, str], _Token] = {}
        # The last challenge of each registry, so later requests authenticate without a 401 first.
        self._challenges: dict[str, Challenge] = {}
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def base_url(self, registry: str) -> str:
        """``http(s)://host[:port]`` for a normalised registry host (``docker.io`` → Docker Hub's API host)."""
        host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]")
        insecure = name in _LOOPBACK or registry in self.insecure_registries or name in self.insecure_registries
        return f"{'http' if insecure else 'https'}://{host}"

    async def resolve(self, ref: ImageRef, credentials: Credentials | None = None) -> ImageManifest | RegistryError:
        """The image's layers for :attr:`platform`, or why not. Never raises (except cancellation)."""
        try:
            return await self._resolve(ref, credentials)
        except RegistryFailure as exc:
            return exc.error
        except TimeoutError:
            return RegistryError(
                ErrorReason.TIMEOUT,
                f"{ref.normalized}: registry {ref.registry} did not answer within {self.timeout:g} s",
            )
        except (aiohttp.ClientError, OSError) as exc:
            text = str(exc).strip() or type(exc).__name__
            return RegistryError(
                ErrorReason.UNREACHABLE, f"{ref.normalized}: cannot reach registry {ref.registry}: {text}"
            )

    async def _resolve(self, ref: ImageRef, credentials: Credentials | None) -> ImageManifest:
        target = ref.digest or ref.tag or "latest"
        document, media_type, digest = await self._manifest(ref, target, credentials)
        top_digest = digest
        platform_known = False
        if media_type in INDEX_TYPES:
            entry = self._choose(ref, document)
            document, media_type, digest = await self._manifest(ref, entry, credentials)
            platform_known = True
            if media_type in INDEX_TYPES:
                raise _failure(ErrorReason.UNSUPPORTED, ref, f"the index entry for {self.platform} is another index")
        layers = self._layers(ref, document)
        if not platform_known and self.verify_platform:
            await self._check_config_platform(ref, document, credentials)
        return ImageManifest(reference=ref.normalized, digest=top_digest, layers=layers, source="registry")

    # -- manifests

    async def _manifest(self, ref: ImageRef, target: str, credentials: Credentials | None) -> tuple[JSON, str, str]:
        url = f"{self.base_url(ref.registry)}/v2/{ref.repository}/manifests/{target}"
        response = await self._get(ref, url, ACCEPT, credentials)
        what = f"manifest {target}" if target.startswith("sha") else f"tag {target}"
        _raise_for_status(ref, response, what)
        body = response.body
        computed = "sha256:" + hashlib.sha256(body).hexdigest()
        header = response.headers.get("Docker-Content-Digest", "").strip()
        if header.startswith("sha256:") and header != computed:
            raise _failure(
                ErrorReason.INVALID, ref, f"{what}: body digest {computed} differs from the registry's {header}"
            )
        if target.startswith("sha256:") and target != computed:
            raise _failure(ErrorReason.INVALID, ref, f"{what}: the registry returned a body with digest {computed}")
        document = _json_object(ref, body, what)
        content_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip()
        media_type = document.get("mediaType") if isinstance(document.get("mediaType"), str) else ""
        media_type = media_type or content_type
        if media_type in _SCHEMA1_TYPES or document.get("schemaVersion") == 1:
            raise _failure(
                ErrorReason.UNSUPPORTED, ref, f"{what} is a Docker schema 1 manifest (deprecated; push it again)"
            )
        if media_type not in INDEX_TYPES | MANIFEST_TYPES:
            # The OCI spec lets mediaType be left out; the shape tells which document it is.
            if isinstance(document.get("manifests"), list):
                media_type = OCI_INDEX
            elif isinstance(document.get("layers"), list):
                media_type = OCI_MANIFEST
            else:
                raise _failure(
                    ErrorReason.UNSUPPORTED, ref, f"{what} has unsupported media type {media_type or '(none)'}"
                )
        return document, media_type, header or computed

    def _choose(self, ref: ImageRef, index: JSON) -> str:
        entries = index.get("manifests")
        if not isinstance(entries, list):
            raise _failure(ErrorReason.INVALID, ref, "image index has no manifests list")
        offered: list[str] = []
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            raw = entry.get("platform")
            platform: JSON = raw if isinstance(raw, dict) else {}
            os, arch = str(platform.get("os", "")), str(platform.get("architecture", ""))
            variant = str(platform.get("variant", ""))
            offered.append("/".join(part for part in (os, arch, variant) if part) or "(no platform)")
            digest = entry.get("digest")
            if self.platform.matches(os, arch, variant) and isinstance(digest, str) and digest.startswith("sha"):
                return digest
        shown = ", ".join(sorted(set(offered))) or "none"
        raise _failure(
            ErrorReason.NO_PLATFORM, ref, f"no image for platform {self.platform} (the index offers {shown})"
        )

    def _layers(self, ref: ImageRef, manifest: JSON) -> tuple[Layer, ...]:
        raw = manifest.get("layers")
        if not isinstance(raw, list):
            raise _failure(ErrorReason.INVALID, ref, "manifest has no layers list")
        layers: list[Layer] = []
        for position, entry in enumerate(raw):
            descriptor: JSON = entry if isinstance(entry, dict) else {}
            digest, size = descriptor.get("digest"), descriptor.get("size")
            if not isinstance(digest, str) or ":" not in digest or not isinstance(size, int) or not _is_count(size):
                raise _failure(ErrorReason.INVALID, ref, f"layers[{position}] needs a digest and a size")
            layers.append(Layer(digest=digest, size=size, uncompressed_size=self._uncompressed(descriptor, size)))
        return tuple(layers)

    def _uncompressed(self, descriptor: JSON, size: int) -> int:
        annotations = descriptor.get("annotations")
        if isinstance(annotations, dict):
            text = annotations.get(UNCOMPRESSED_SIZE_ANNOTATION)
            if isinstance(text, str) and text.isdigit():
                return int(text)
        if descriptor.get("mediaType") in _UNCOMPRESSED_LAYER_TYPES:
            return size
        return round(size * self.uncompressed_ratio)

    async def _check_config_platform(self, ref: ImageRef, manifest: JSON, credentials: Credentials | None) -> None:
        config = manifest.get("config")
        digest = config.get("digest") if isinstance(config, dict) else None
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            return  # nothing to check against; the layers are what the plan needs
        url = f"{self.base_url(ref.registry)}/v2/{ref.repository}/blobs/{digest}"
        response = await self._get(ref, url, "*/*", credentials)
        _raise_for_status(ref, response, f"config blob {digest}")
        if "sha256:" + hashlib.sha256(response.body).hexdigest() != digest:
            raise _failure(ErrorReason.INVALID, ref, f"config blob {digest}: the body has another digest")
        image = _json_object(ref, response.body, f"config blob {digest}")
        os, arch = image.get("os"), image.get("architecture")
        if isinstance(os, str) and isinstance(arch, str) and os and arch:
            variant = image.get("variant") if isinstance(image.get("variant"), str) else ""
            if not self.platform.matches(os, arch, str(variant)):
                raise _failure(
                    ErrorReason.NO_PLATFORM,
                    ref,
                    f"the image is for {os}/{arch}, not for the node's platform {self.platform}",
                )

    # -- HTTP and authentication

    async def _get(self, ref: ImageRef, url: str, accept: str, credentials: Credentials | None) -> _Response:
        registry = ref.registry
        headers = {"Accept": accept}
        challenge = self._challenges.get(registry)
        if challenge is not None:
            authorization = await self._authorization(ref, challenge, credentials, renew=False)
            if authorization:
                headers["Authorization"] = authorization
        response = await self._fetch(url, headers)
        if response.status != 401:
            return response
        parsed = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if parsed is None or parsed.scheme not in ("bearer", "basic"):
            raise _failure(
                ErrorReason.UNAUTHORIZED,
                ref,
                f"registry {registry} refused the request (401) without a usable challenge",
            )
        self._challenges[registry] = parsed
        authorization = await self._authorization(ref, parsed, credentials, renew=True)
        if authorization is None:
            raise _failure(
                ErrorReason.UNAUTHORIZED,
                ref,
                f"registry {registry} requires credentials (HTTP Basic) and the Pod has no imagePullSecret for it",
            )
        response = await self._fetch(url, {**headers, "Authorization": authorization})
        if response.status == 401:
            who = f"user {credentials.username}" if credentials else "anonymous access"
            raise _failure(
                ErrorReason.UNAUTHORIZED, ref, f"registry {registry} refused {who} (401): {_error_text(response)}"
            )
        return response

    async def _authorization(
        self, ref: ImageRef, challenge: Challenge, credentials: Credentials | None, *, renew: bool
    ) -> str | None:
        if challenge.scheme == "basic":
            return _basic(credentials) if credentials else None
        if challenge.scheme != "bearer":
            return None
        realm = challenge.params.get("realm", "")
        service = challenge.params.get("service", "")
        # The challenge's own scope may be another repository's (it is remembered per registry).
        scope = f"repository:{ref.repository}:pull"
        key = (realm, service, scope, credentials.username if credentials else "")
        loop = asyncio.get_running_loop()
        cached = self._tokens.get(key)
        if cached is not None and not renew and cached.expires_at > loop.time():
            return f"Bearer {cached.value}"
        token = await self._fetch_token(ref, realm, service, scope, credentials)
        self._tokens[key] = token
        return f"Bearer {token.value}"

    async def _fetch_token(
        self, ref: ImageRef, realm: str, service: str, scope: str, credentials: Credentials | None
    ) -> _Token:
        if not realm.startswith(("http://", "https://")):
            raise _failure(
                ErrorReason.UNAUTHORIZED, ref, f"registry {ref.registry} named an invalid token realm {realm[:100]!r}"
            )
        params = {"scope": scope} | ({"service": service} if service else {})
        url = realm + ("&" if "?" in realm else "?") + urlencode(params)
        headers = {"Accept": "application/json"}
        if credentials is not None:
            headers["Authorization"] = _basic(credentials)
        response = await self._fetch(url, headers)
        if response.status != 200:
            who = f"user {credentials.username}" if credentials else "anonymous access"
            raise _failure(
                ErrorReason.UNAUTHORIZED,
                ref,
                f"token server {realm[:100]} refused {who} ({response.status}): {_error_text(response)}",
            )
        document = _json_object(ref, response.body, "token response")
        value = document.get("token") or document.get("access_token")
        if not isinstance(value, str) or not value:
            raise _failure(ErrorReason.UNAUTHORIZED, ref, f"token server {realm[:100]} returned no token")
        expires_in = document.get("expires_in")
        seconds = float(expires_in) if _is_count(expires_in) and expires_in else _DEFAULT_TOKEN_SECONDS
        loop = asyncio.get_running_loop()
        return _Token(value, loop.time() + seconds - min(_TOKEN_MARGIN_SECONDS, seconds / 2))

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("RegistryClient is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout, connect=min(self.timeout, 10.0)),
                headers={"User-Agent": f"vk-provider/{__version__}"},
            )
        return self._session

    async def _fetch(self, url: str, headers: Mapping[str, str]) -> _Response:
        """GET with redirects followed by hand: Authorization is dropped when the origin changes."""
        sent = dict(headers)
        for _ in range(_MAX_REDIRECTS + 1):
            self.requests += 1
            async with self._client().get(url, headers=sent, allow_redirects=False) as resp:
                if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                    target = urljoin(url, resp.headers["Location"])
                    if _origin(target) != _origin(url):
                        sent.pop("Authorization", None)
                    url = target
                    continue
                limit = self.max_manifest_bytes if resp.status == 200 else _MAX_ERROR_BODY_BYTES
                if resp.status == 200 and resp.content_length is not None and resp.content_length > limit:
                    raise _too_large(url, resp.content_length, limit)
                body = await resp.content.read(limit + 1)
                if len(body) > limit:
                    if resp.status == 200:
                        raise _too_large(url, None, limit)
                    body = body[:limit]
                return _Response(resp.status, resp.headers, body)
        raise RegistryFailure(RegistryError(ErrorReason.HTTP, f"{url}: more than {_MAX_REDIRECTS} redirects"))


def _failure(reason: ErrorReason, ref: ImageRef, text: str) -> RegistryFailure:
    return RegistryFailure(RegistryError(reason, f"{ref.normalized}: {text}"))


def _too_large(url: str, size: int | None, limit: int) -> RegistryFailure:
    got = f"{size} bytes" if size is not None else "more"
    return RegistryFailure(RegistryError(ErrorReason.TOO_LARGE, f"{url}: {got}, above the limit of {limit} bytes"))


def _raise_for_status(ref: ImageRef, response: _Response, what: str) -> None:
    status = response.status
    if status == 200:
        return
    detail = _error_text(response)
    if status == 404:
        raise _failure(ErrorReason.NOT_FOUND, ref, f"{what} not found in {ref.registry}/{ref.repository} ({detail})")
    if status in (401, 403):
        raise _failure(ErrorReason.UNAUTHORIZED, ref, f"{what}: access denied ({status}: {detail})")
    if status == 429:
        raise _failure(ErrorReason.TOO_MANY_REQUESTS, ref, f"{what}: registry rate limit (429: {detail})")
    raise _failure(ErrorReason.HTTP, ref, f"{what}: registry answered {status} ({detail})")


def _error_text(response: _Response) -> str:
    """The Distribution API's ``{"errors": [{"code", "message"}]}``, or the start of the body."""
    try:
        document = json.loads(response.body)
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("errors"), list):
        parts = [
            f"{error.get('code', '')}: {error.get('message', '')}".strip(": ")
            for error in document["errors"]
            if isinstance(error, dict)
        ]
        if parts:
            return "; ".join(parts)[:300]
    text = response.body[:200].decode("utf-8", "replace").strip()
    return text or "no details"


def _json_object(ref: ImageRef, body: bytes, what: str) -> JSON:
    try:
        document = json.loads(body)
    except ValueError:
        raise _failure(ErrorReason.INVALID, ref, f"{what} is not JSON") from None
    if not isinstance(document, dict):
        raise _failure(ErrorReason.INVALID, ref, f"{what} is not a JSON object")
    return document


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _basic(credentials: Credentials) -> str:
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()
