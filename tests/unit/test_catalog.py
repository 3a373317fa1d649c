"""The image catalog: the shipped file, the format's problems, merging and synthetic manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from vk_provider.domain.catalog import (
    SYNTHETIC_MAX_BYTES,
    SYNTHETIC_MAX_LAYERS,
    SYNTHETIC_MIN_BYTES,
    SYNTHETIC_MIN_LAYERS,
    Catalog,
    CatalogProblem,
    manifest_for,
    merge_catalogs,
    parse_catalog,
    synthetic_manifest,
)

CATALOG_FILE = Path(__file__).resolve().parents[2] / "config" / "images.yaml"
D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


@pytest.fixture(scope="module")
def shipped() -> Catalog:
    return parse_catalog(yaml.safe_load(CATALOG_FILE.read_text()), "config/images.yaml")


def hub(name: str) -> str:
    return f"docker.io/library/{name}"


# ---- the shipped catalog ------------------------------------------------------------------------


def test_shipped_catalog_parses_without_problems(shipped: Catalog) -> None:
    assert shipped.problems == ()
    assert all(manifest.source == "catalog" for manifest in shipped.images.values())


@pytest.mark.parametrize(
    "reference",
    [
        "nginx:1.7.9",
        "nginx:1.27",
        "nginx:latest",
        "busybox:1.36",
        "alpine:3.20",
        "redis:7.2",
        "postgres:16",
        "mysql:8.0",
        "python:3.12",
        "node:20",
        "eclipse-temurin:21",
        "httpd:2.4",
        "golang:1.22",
        "ubuntu:24.04",
        "debian:bookworm",
        "nginx",  # any spelling finds the entry
    ],
)
def test_shipped_catalog_has_the_common_images(shipped: Catalog, reference: str) -> None:
    assert shipped.get(reference) is not None


def test_seed_image_has_its_docker_hub_size(shipped: Catalog) -> None:
    nginx = shipped.images[hub("nginx:1.7.9")]
    assert nginx.size == pytest.approx(39e6, rel=0.05)
    assert nginx.uncompressed_size == pytest.approx(91.7e6, rel=0.05)


@pytest.mark.parametrize(
    ("base", "images"),
    [
        ("debian:bookworm-slim", ["nginx:1.27", "python:3.12-slim", "redis:7.2", "postgres:16", "httpd:2.4"]),
        ("alpine:3.20", ["nginx:1.27-alpine", "python:3.12-alpine", "redis:7.2-alpine", "node:20-alpine"]),
        ("debian:bookworm", ["python:3.12", "python:3.11", "node:20", "golang:1.22"]),
        ("ubuntu:24.04", ["eclipse-temurin:21", "eclipse-temurin:21-jre"]),
    ],
)
def test_images_on_one_base_share_its_layer_digest(shipped: Catalog, base: str, images: list[str]) -> None:
    base_layer = shipped.images[hub(base)].layers[0]
    for name in images:
        assert shipped.images[hub(name)].layers[0] == base_layer, name


def test_shipped_digests_name_one_blob_each(shipped: Catalog) -> None:
    sizes: dict[str, tuple[int, int]] = {}
    for manifest in shipped.images.values():
        for item in manifest.layers:
            assert sizes.setdefault(item.digest, (item.size, item.uncompressed_size)) == (
                item.size,
                item.uncompressed_size,
            )


# ---- problems -----------------------------------------------------------------------------------


def good_layer(digest: str = D1, size: Any = 1000, unpacked: Any = 2500) -> dict[str, Any]:
    return {"digest": digest, "size": size, "uncompressed_size": unpacked}


@pytest.mark.parametrize(
    ("data", "image", "field", "fragment"),
    [
        (["nginx"], "", "", "must be a mapping with an 'images' key, got list"),
        ({"version": 2, "images": {}}, "", "version", "unsupported catalog version 2"),
        ({"images": ["nginx"]}, "", "images", "must be a mapping of image reference"),
        ({"imgs": {}}, "", "imgs", "unknown top-level key"),
        ({"images": {"Not A Ref": {"layers": [good_layer()]}}}, "Not A Ref", "", "not a valid image reference"),
        ({"images": {"nginx:1": "big"}}, "nginx:1", "", "must be a mapping with 'layers', got str"),
        ({"images": {"nginx:1": {"layers": []}}}, "nginx:1", "layers", "non-empty list of layers"),
        ({"images": {"nginx:1": {}}}, "nginx:1", "layers", "non-empty list of layers, got nothing"),
        ({"images": {"nginx:1": {"layers": [good_layer("sha256:abc")]}}}, "nginx:1", "layers[0].digest", "64"),
        ({"images": {"nginx:1": {"layers": [good_layer(size=0)]}}}, "nginx:1", "layers[0].size", "at least 1"),
        ({"images": {"nginx:1": {"layers": [good_layer(size="big")]}}}, "nginx:1", "layers[0].size", "'39.1 MB'"),
        ({"images": {"nginx:1": {"layers": [good_layer(size=True)]}}}, "nginx:1", "layers[0].size", "got True"),
        ({"images": {"nginx:1": {"layers": [good_layer(size="3 kiB")]}}}, "nginx:1", "layers[0].size", "'3 kiB'"),
        (
            {"images": {"nginx:1": {"layers": [good_layer(unpacked=None)]}}},
            "nginx:1",
            "layers[0].uncompressed_size",
            "must be a number of bytes",
        ),
        (
            {"images": {"nginx:1": {"layers": [{**good_layer(), "compressed": 1}]}}},
            "nginx:1",
            "layers[0].compressed",
            "unknown key",
        ),
        ({"images": {"nginx:1": {"layers": [good_layer()], "size": 3}}}, "nginx:1", "size", "unknown key"),
        (
            {"images": {"nginx:1": {"layers": [good_layer()], "approximate": "yes"}}},
            "nginx:1",
            "approximate",
            "true or false",
        ),
        (
            {"images": {"nginx:1": {"layers": [good_layer()], "digest": "sha256:xyz"}}},
            "nginx:1",
            "digest",
            "64 lowercase hex",
        ),
        (
            {
                "images": {
                    "nginx:1": {"layers": [good_layer()]},
                    "docker.io/library/nginx:1": {"layers": [good_layer()]},
                }
            },
            "docker.io/library/nginx:1",
            "",
            "the same image as 'nginx:1'",
        ),
        (
            {
                "images": {
                    "a:1": {"layers": [good_layer(D1, 1000)]},
                    "b:1": {"layers": [good_layer(D2), good_layer(D1, 2000)]},
                }
            },
            "b:1",
            "layers[1]",
            "but 1000/2500 in 'a:1'; a digest names one blob",
        ),
    ],
)
def test_bad_entries_are_problems_naming_image_and_field(data: object, image: str, field: str, fragment: str) -> None:
    catalog = parse_catalog(data, "mine.yaml")
    assert len(catalog.problems) == 1, catalog.problems
    problem = catalog.problems[0]
    assert (problem.source, problem.image, problem.field) == ("mine.yaml", image, field)
    assert fragment in problem.message
    assert str(problem).startswith("mine.yaml: ")


def test_a_bad_image_is_left_out_and_the_rest_kept() -> None:
    catalog = parse_catalog(
        {"images": {"good:1": {"layers": [good_layer()]}, "bad:1": {"layers": [good_layer(size=-5)]}}}, "x"
    )
    assert list(catalog.images) == [hub("good:1")]
    assert [problem.image for problem in catalog.problems] == ["bad:1"]


def test_problem_renders_every_part() -> None:
    problem = CatalogProblem("mine.yaml", "nginx:1", "layers[0].size", "must be at least 1 bytes, got 0")
    assert str(problem) == "mine.yaml: image 'nginx:1': layers[0].size: must be at least 1 bytes, got 0"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (1234, 1234),
        ("1234", 1234),
        ("39.1 MB", 39_100_000),
        ("39.1MB", 39_100_000),
        ("2 GB", 2_000_000_000),
        ("1.5 kB", 1500),
        ("1 KiB", 1024),
        ("91 MiB", 91 * 2**20),
        ("628 B", 628),
    ],
)
def test_sizes_accept_bytes_or_units(text: object, size: int) -> None:
    catalog = parse_catalog({"images": {"a:1": {"layers": [good_layer(size=text)]}}})
    assert catalog.problems == ()
    assert catalog.images[hub("a:1")].layers[0].size == size


@pytest.mark.parametrize("size", [2**50 + 1, 10**19, "2000000 GB", "1" + "0" * 400 + " GB"])
def test_sizes_beyond_a_pebibyte_are_problems(size: object) -> None:
    catalog = parse_catalog({"images": {"a:1": {"layers": [good_layer(size=size)]}}})
    assert catalog.images == {}
    (problem,) = catalog.problems
    assert "must be at most 1125899906842624 bytes (1 PiB" in str(problem)
    assert len(str(problem)) < 200


@pytest.mark.parametrize("size", ["\uff13\uff19 MB", "\u0663\u0669 MB"])  # full-width and Arabic-Indic 39
def test_sizes_in_digits_other_than_ascii_are_problems(size: str) -> None:
    catalog = parse_catalog({"images": {"a:1": {"layers": [good_layer(size=size)]}}})
    assert catalog.images == {}
    (problem,) = catalog.problems
    assert "must be a number of bytes or a size like '39.1 MB'" in str(problem)


def test_empty_documents_are_empty_catalogs() -> None:
    assert parse_catalog(None) == Catalog()
    assert parse_catalog({"version": 1, "images": None}).images == {}


def test_entry_without_digest_gets_a_stable_one_from_its_layers() -> None:
    data = {"images": {"a:1": {"layers": [good_layer(D1), good_layer(D2)]}, "b:1": {"layers": [good_layer(D1)]}}}
    first, again = parse_catalog(data), parse_catalog(data)
    assert first.images[hub("a:1")].digest == again.images[hub("a:1")].digest
    assert first.images[hub("a:1")].digest != first.images[hub("b:1")].digest
    assert first.images[hub("a:1")].digest.startswith("sha256:")


# ---- merging ------------------------------------------------------------------------------------


def test_user_catalogs_override_whole_entries_in_order() -> None:
    shipped = parse_catalog(
        {"images": {"nginx:1": {"layers": [good_layer(D1)]}, "redis:7": {"layers": [good_layer(D2)]}}}
    )
    mine = parse_catalog({"images": {"docker.io/library/nginx:1": {"layers": [good_layer(D3, 5, 6)]}}}, "mine")
    theirs = parse_catalog({"images": {"nginx:1": {"layers": [good_layer(D2, 7, 8)]}}, "bogus": 1}, "theirs")
    merged = merge_catalogs(shipped, mine, theirs)
    assert merged.images[hub("nginx:1")].layers[0].digest == D2
    assert merged.images[hub("redis:7")].layers[0].digest == D2
    assert [problem.source for problem in merged.problems] == ["theirs"]


# ---- synthetic manifests ------------------------------------------------------------------------


@given(reference=st.from_regex(r"[a-z]{1,12}(/[a-z]{1,8})?:[a-z0-9]{1,6}", fullmatch=True), seed=st.integers(0, 99))
def test_synthetic_manifests_are_realistic_and_deterministic(reference: str, seed: int) -> None:
    manifest = synthetic_manifest(reference, seed)
    assert manifest == synthetic_manifest(reference, seed)
    assert manifest.source == "synthetic"
    assert SYNTHETIC_MIN_LAYERS <= len(manifest.layers) <= SYNTHETIC_MAX_LAYERS
    assert SYNTHETIC_MIN_BYTES <= manifest.size <= SYNTHETIC_MAX_BYTES
    assert all(item.uncompressed_size > item.size for item in manifest.layers)
    assert len({item.digest for item in manifest.layers}) == len(manifest.layers)
    assert manifest.reference.startswith("docker.io/")


def test_synthetic_manifests_depend_on_reference_and_seed_only() -> None:
    assert synthetic_manifest("app:1") == synthetic_manifest("docker.io/library/app:1")
    assert synthetic_manifest("app:1").size != synthetic_manifest("app:2").size
    assert synthetic_manifest("app:1", seed=1).size != synthetic_manifest("app:1", seed=2).size
    sizes = [synthetic_manifest(f"app:{n}").size for n in range(200)]
    # Spread over the range, not clumped.
    assert min(sizes) < 20e6
    assert max(sizes) > 200e6


def test_manifest_for_prefers_the_catalog(shipped: Catalog) -> None:
    assert manifest_for(shipped, "nginx:1.7.9") is shipped.images[hub("nginx:1.7.9")]
    unknown = manifest_for(shipped, "example.com/team/app:3")
    assert unknown is not None
    assert unknown.source == "synthetic"
    assert unknown.reference == "example.com/team/app:3"
    assert manifest_for(shipped, "Not A Ref") is None


def test_a_synthetic_image_pinned_by_digest_has_that_digest() -> None:
    pinned = "sha256:" + "1" * 64
    assert synthetic_manifest(f"nginx@{pinned}").digest == pinned
    assert synthetic_manifest(f"nginx:1.7.9@{pinned}").digest == pinned
    assert synthetic_manifest("nginx:1.7.9").digest != pinned
