"""Image references: parsing, Docker Hub normalisation and the cache matching rule.

Owns the grammar of an image reference (``[registry/]repository[:tag][@digest]``, as
distribution/reference defines it) and the one rule that says whether an image held by a cache
satisfies an image a Pod wants. Every other module compares images through the normalised form
produced here, so ``nginx:1.7.9`` and ``docker.io/library/nginx:1.7.9`` are the same image.

PURE: stdlib only, no I/O. Never raises on bad input: an invalid reference comes back as an
``InvalidReference`` value carrying a message fit to show a user.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

from vk_provider.domain.model import CachedImage

DOCKER_HUB = "docker.io"
DEFAULT_TAG = "latest"
MAX_REFERENCE_LENGTH = 4096
# distribution/reference's NameTotalLengthMax: registry + "/" + repository.
MAX_NAME_LENGTH = 255

# Hosts that Docker treats as aliases of Docker Hub; folding them keeps one cache usable by Pods
# that spell the same image differently.
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?",
)
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[0-9a-f]+")
_WHITESPACE_RE = re.compile(r"\s")

# Long inputs are cut in messages so one bad annotation cannot flood an Event.
_SHOWN_LENGTH = 80


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A parsed, normalised image reference.

    ``registry`` is lower-case with Docker Hub aliases folded into ``docker.io``; ``repository``
    is the path inside the registry (``library/nginx``). ``tag`` is ``None`` only when the
    reference is pinned by digest alone (``nginx@sha256:…``); otherwise it defaults to ``latest``.
    """

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """Registry and repository: the part two references must share to be the same image."""
        return f"{self.registry}/{self.repository}"

    @property
    def normalized(self) -> str:
        tag = f":{self.tag}" if self.tag is not None else ""
        digest = f"@{self.digest}" if self.digest is not None else ""
        return f"{self.name}{tag}{digest}"

    def __str__(self) -> str:
        return self.normalized


@dataclass(frozen=True, slots=True)
class InvalidReference:
    """Why a text is not an image reference; returned, never raised."""

    text: str
    reason: str

    @property
    def message(self) -> str:
        return f"invalid image reference {quote(self.text)}: {self.reason}"

    def __str__(self) -> str:
        return self.message


def shorten(text: str, limit: int = _SHOWN_LENGTH) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis, for messages."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quote(text: str) -> str:
    """``text`` shortened and double-quoted (JSON style) for a message, as kubectl shows values."""
    return json.dumps(shorten(text), ensure_ascii=False)


def parse_reference(text: str) -> ImageRef | InvalidReference:
    """Parse and normalise ``text``; an ``InvalidReference`` says what is wrong with it."""
    # The same few references come back for every Pod and every cache: remember them (results are
    # immutable), but not arbitrarily long text, so a hostile Pod spec cannot fill the memory.
    return _parse_cached(text) if len(text) <= 512 else _parse(text)


@lru_cache(maxsize=4096)
def _parse_cached(text: str) -> ImageRef | InvalidReference:
    return _parse(text)


def _parse(text: str) -> ImageRef | InvalidReference:
    if not text:
        return InvalidReference(text, "empty reference")
    if len(text) > MAX_REFERENCE_LENGTH:
        return InvalidReference(text, f"longer than {MAX_REFERENCE_LENGTH} characters")
    if _WHITESPACE_RE.search(text):
        return InvalidReference(text, "contains whitespace")

    name_and_tag, at, digest_text = text.partition("@")
    digest: str | None = None
    if at:
        problem = _digest_problem(digest_text)
        if problem:
            return InvalidReference(text, problem)
        digest = digest_text

    tag: str | None = None
    colon = name_and_tag.rfind(":")
    # A colon before the last slash belongs to a registry port, not a tag.
    if colon > name_and_tag.rfind("/"):
        tag = name_and_tag[colon + 1 :]
        name_and_tag = name_and_tag[:colon]
        if not tag:
            return InvalidReference(text, "empty tag after ':'")
        if not _TAG_RE.fullmatch(tag):
            return InvalidReference(text, f"invalid tag {quote(tag)} (letters, digits, '_', '.', '-'; at most 128)")

    registry, repository = _split_registry(name_and_tag)
    if not _DOMAIN_RE.fullmatch(registry):
        return InvalidReference(text, f"invalid registry host {quote(registry)}")
    problem = _repository_problem(repository)
    if problem:
        return InvalidReference(text, problem)

    registry = registry.lower()
    if registry in _DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in repository:
            repository = f"library/{repository}"
    if len(registry) + 1 + len(repository) > MAX_NAME_LENGTH:
        return InvalidReference(text, f"repository name longer than {MAX_NAME_LENGTH} characters")

    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageRef(registry=registry, repository=repository, tag=tag, digest=digest)


def normalize(text: str) -> str | None:
    """The normalised form of ``text``, or ``None`` if it is not a valid reference."""
    parsed = parse_reference(text)
    return parsed.normalized if isinstance(parsed, ImageRef) else None


def matches(cached: CachedImage | ImageRef, wanted: ImageRef) -> bool:
    """Whether an image held by a cache satisfies an image a Pod wants.

    Same registry and repository, and then: when both sides know a digest, the digests must be
    equal (a pinned digest names exactly one image, so an equal tag with another digest is a
    different image); otherwise the tags must be equal. A cached image's digest comes from its
    reference or, failing that, from ``CachedImage.digest`` (the manifest resolved at build time).
    """
    if isinstance(cached, CachedImage):
        parsed = parse_reference(cached.reference)
        if isinstance(parsed, InvalidReference):
            return False
        return matches_parsed(parsed, cached.digest, wanted)
    return matches_parsed(cached, "", wanted)


def matches_parsed(cached_ref: ImageRef, resolved_digest: str, wanted: ImageRef) -> bool:
    """``matches`` for an already parsed cached reference and its resolved digest ("" if unknown)."""
    cached_digest = cached_ref.digest or resolved_digest or None
    if cached_ref.name != wanted.name:
        return False
    if wanted.digest is not None and cached_digest is not None:
        return cached_digest == wanted.digest
    return wanted.tag is not None and cached_ref.tag == wanted.tag


def _digest_problem(digest: str) -> str | None:
    algorithm, colon, hex_part = digest.partition(":")
    if not colon:
        return f"digest {quote(digest)} is not '<algorithm>:<hex>'"
    expected = _DIGEST_HEX_LENGTH.get(algorithm)
    if expected is None:
        return f"unsupported digest algorithm {quote(algorithm)} (sha256 or sha512)"
    if len(hex_part) != expected or not _HEX_RE.fullmatch(hex_part):
        return f"{algorithm} digest must be {expected} lowercase hex characters"
    return None


def _split_registry(name: str) -> tuple[str, str]:
    """Split off the registry host the way Docker does.

    The first path component is a host only if it looks like one (has a '.' or ':', is
    ``localhost``, or has upper case, which a repository never may); otherwise the whole name is
    a Docker Hub repository (``user/app``).
    """
    slash = name.find("/")
    if slash == -1:
        return DOCKER_HUB, name
    first = name[:slash]
    if "." in first or ":" in first or first == "localhost" or first.lower() != first:
        return first, name[slash + 1 :]
    return DOCKER_HUB, name


def _repository_problem(repository: str) -> str | None:
    if not repository:
        return "empty repository name"
    for component in repository.split("/"):
        if not component:
            return "empty path component in repository name"
        if _PATH_COMPONENT_RE.fullmatch(component):
            continue
        if component.lower() != component:
            return "repository name must be lowercase"
        return (
            f"invalid repository path component {quote(component)} "
            "(lowercase letters and digits, separated by '.', '_', '__' or '-')"
        )
    return None
