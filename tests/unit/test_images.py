"""Image reference parsing, Docker Hub normalisation and the cache matching rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vk_provider.domain.images import (
    ImageRef,
    InvalidReference,
    matches,
    normalize,
    parse_reference,
)
from vk_provider.domain.model import CachedImage

DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "normalized"),
    [
        ("nginx", "docker.io", "library/nginx", "latest", None, "docker.io/library/nginx:latest"),
        ("nginx:1.7.9", "docker.io", "library/nginx", "1.7.9", None, "docker.io/library/nginx:1.7.9"),
        (
            "docker.io/library/nginx:1.7.9",
            "docker.io",
            "library/nginx",
            "1.7.9",
            None,
            "docker.io/library/nginx:1.7.9",
        ),
        ("docker.io/nginx", "docker.io", "library/nginx", "latest", None, "docker.io/library/nginx:latest"),
        ("index.docker.io/nginx:1", "docker.io", "library/nginx", "1", None, "docker.io/library/nginx:1"),
        (
            "registry-1.docker.io/user/app",
            "docker.io",
            "user/app",
            "latest",
            None,
            "docker.io/user/app:latest",
        ),
        ("user/app", "docker.io", "user/app", "latest", None, "docker.io/user/app:latest"),
        ("user/app:v2", "docker.io", "user/app", "v2", None, "docker.io/user/app:v2"),
        ("localhost/x", "localhost", "x", "latest", None, "localhost/x:latest"),
        ("localhost:5000/x", "localhost:5000", "x", "latest", None, "localhost:5000/x:latest"),
        ("localhost:5000/x:1.0", "localhost:5000", "x", "1.0", None, "localhost:5000/x:1.0"),
        (
            "registry.cn-hangzhou.aliyuncs.com/ns/app:1",
            "registry.cn-hangzhou.aliyuncs.com",
            "ns/app",
            "1",
            None,
            "registry.cn-hangzhou.aliyuncs.com/ns/app:1",
        ),
        (
            "Registry.Example.com/a/b",
            "registry.example.com",
            "a/b",
            "latest",
            None,
            "registry.example.com/a/b:latest",
        ),
        ("[::1]:5000/app", "[::1]:5000", "app", "latest", None, "[::1]:5000/app:latest"),
        ("nginx@" + DIGEST, "docker.io", "library/nginx", None, DIGEST, "docker.io/library/nginx@" + DIGEST),
        (
            "nginx:1.7.9@" + DIGEST,
            "docker.io",
            "library/nginx",
            "1.7.9",
            DIGEST,
            "docker.io/library/nginx:1.7.9@" + DIGEST,
        ),
        (
            "a/b-c__d.e/f_g:T_1.x-y",
            "docker.io",
            "a/b-c__d.e/f_g",
            "T_1.x-y",
            None,
            "docker.io/a/b-c__d.e/f_g:T_1.x-y",
        ),
    ],
)
def test_parse_valid_references(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None, normalized: str
) -> None:
    parsed = parse_reference(text)
    assert parsed == ImageRef(registry=registry, repository=repository, tag=tag, digest=digest)
    assert isinstance(parsed, ImageRef)
    assert parsed.normalized == normalized
    assert normalize(text) == normalized


@pytest.mark.parametrize(
    ("text", "reason_part"),
    [
        ("", "empty reference"),
        ("Nginx", "must be lowercase"),
        ("docker.io/Library/nginx", "must be lowercase"),
        ("nginx 1.7.9", "whitespace"),
        (" nginx", "whitespace"),
        ("nginx\t", "whitespace"),
        ("a" * 4097, "longer than 4096"),
        ("nginx:", "empty tag"),
        ("nginx:-bad", "invalid tag"),
        ("nginx:" + "t" * 129, "invalid tag"),
        ("nginx@sha256:abc", "64 lowercase hex"),
        ("nginx@sha256:" + "AB" * 32, "64 lowercase hex"),
        ("nginx@md5:" + "ab" * 16, "unsupported digest algorithm"),
        ("nginx@" + "ab" * 32, "not '<algorithm>:<hex>'"),
        ("nginx@" + DIGEST + "@" + DIGEST, "64 lowercase hex"),
        ("/nginx", "empty path component"),
        ("docker.io/", "empty repository"),
        ("a//b", "empty path component"),
        ("a/b_", "invalid repository path component"),
        ("-host.com/x", "invalid registry host"),
        ("example.com/" + "a" * 250, "longer than 255"),
    ],
)
def test_invalid_references_are_values_with_a_reason(text: str, reason_part: str) -> None:
    parsed = parse_reference(text)
    assert isinstance(parsed, InvalidReference)
    assert reason_part in parsed.reason
    assert parsed.message.startswith("invalid image reference ")
    assert normalize(text) is None


def test_invalid_reference_message_shortens_huge_input() -> None:
    parsed = parse_reference("x" * 10_000)
    assert isinstance(parsed, InvalidReference)
    assert len(parsed.message) < 200


@pytest.mark.parametrize(
    ("spellings"),
    [
        (
            "nginx:1.7.9",
            "docker.io/library/nginx:1.7.9",
            "index.docker.io/library/nginx:1.7.9",
            "docker.io/nginx:1.7.9",
        ),
        ("nginx", "nginx:latest", "registry-1.docker.io/library/nginx:latest"),
        ("user/app", "docker.io/user/app", "index.docker.io/user/app:latest"),
    ],
)
def test_docker_hub_spellings_normalise_alike(spellings: tuple[str, ...]) -> None:
    assert len({normalize(text) for text in spellings}) == 1


def _ref(text: str) -> ImageRef:
    parsed = parse_reference(text)
    assert isinstance(parsed, ImageRef)
    return parsed


@pytest.mark.parametrize(
    ("cached", "wanted", "expected"),
    [
        (CachedImage("docker.io/library/nginx:1.7.9", 1), "nginx:1.7.9", True),
        (CachedImage("docker.io/library/nginx:1.7.9", 1), "nginx:1.7.10", False),
        (CachedImage("docker.io/library/nginx:1.7.9", 1), "nginx", False),
        (CachedImage("docker.io/library/nginx:latest", 1), "nginx", True),
        (CachedImage("docker.io/library/nginx:1.7.9", 1), "other/nginx:1.7.9", False),
        (CachedImage("docker.io/library/nginx:1.7.9", 1), "quay.io/library/nginx:1.7.9", False),
        # digest pins: a known digest decides
        (CachedImage("docker.io/library/nginx:1.7.9", 1, DIGEST), "nginx@" + DIGEST, True),
        (CachedImage("docker.io/library/nginx:1.7.9", 1, OTHER_DIGEST), "nginx@" + DIGEST, False),
        (CachedImage("docker.io/library/nginx:1.7.9", 1, OTHER_DIGEST), "nginx:1.7.9@" + DIGEST, False),
        (CachedImage("docker.io/library/nginx@" + DIGEST, 1), "nginx@" + DIGEST, True),
        (CachedImage("docker.io/library/nginx:1.7.9@" + DIGEST, 1), "nginx:1.7.9", True),
        (CachedImage("docker.io/library/nginx:1.7.9@" + DIGEST, 1), "nginx:2@" + DIGEST, True),
        # unknown cached digest: fall back to the tag
        (CachedImage("docker.io/library/nginx:1.7.9", 1), "nginx:1.7.9@" + DIGEST, True),
        (CachedImage("docker.io/library/nginx:1.7.9", 1), "nginx@" + DIGEST, False),
        # a digest on the cached side does not stop a tag match
        (CachedImage("docker.io/library/nginx:1.7.9", 1, DIGEST), "nginx:1.7.9", True),
        (CachedImage("not a reference", 1), "nginx", False),
    ],
)
def test_matches(cached: CachedImage, wanted: str, expected: bool) -> None:
    assert matches(cached, _ref(wanted)) is expected


def test_matches_accepts_a_parsed_reference() -> None:
    assert matches(_ref("docker.io/library/nginx:1.7.9"), _ref("nginx:1.7.9"))
    assert not matches(_ref("nginx@" + OTHER_DIGEST), _ref("nginx@" + DIGEST))


_component = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,8})?", fullmatch=True)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}", fullmatch=True)
_registry = st.sampled_from(["", "docker.io/", "index.docker.io/", "quay.io/", "localhost:5000/", "r.example.com/"])
_digest = st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True)


@st.composite
def references(draw: st.DrawFn) -> str:
    path = "/".join(draw(st.lists(_component, min_size=1, max_size=3)))
    text = draw(_registry) + path
    if draw(st.booleans()):
        text += ":" + draw(_tag)
    if draw(st.booleans()):
        text += "@" + draw(_digest)
    return text


@given(references())
def test_normalisation_is_idempotent(text: str) -> None:
    first = normalize(text)
    assert first is not None
    assert normalize(first) == first
    assert parse_reference(first) == parse_reference(text)


@given(st.text(max_size=300))
def test_arbitrary_text_never_raises(text: str) -> None:
    parsed = parse_reference(text)
    assert isinstance(parsed, ImageRef | InvalidReference)
    if isinstance(parsed, ImageRef):
        assert parse_reference(parsed.normalized) == parsed


@given(references())
def test_an_image_matches_its_own_cached_copy(text: str) -> None:
    wanted = _ref(text)
    assert matches(CachedImage(wanted.normalized, 1), wanted)
