"""The image catalog: image references → manifests (layers with digest and sizes).

Owns the catalog format (documented at the top of config/images.yaml and in docs/pull-model.md):
parsing an already-loaded mapping into manifests keyed by normalised reference, with every problem
returned as a value naming the file, the image and the field; merging user catalogs over the
shipped one; and the deterministic synthetic manifest used for images no catalog knows.

PURE: stdlib only. Reading or watching files, and YAML itself, belong to the caller; nothing here
raises on bad data, and the synthetic sizes come from a hash of the reference, never from a clock
or a random generator.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from vk_provider.domain.images import normalize
from vk_provider.domain.model import ImageManifest, Layer

CATALOG_VERSION = 1

# The parsers' problem callback: (field, message) -> None.
_Report = Callable[[str, str], None]

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kKMG]i?B|B)?", re.ASCII)
_UNITS = {
    None: 1,
    "B": 1,
    "kB": 10**3,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
}
_IMAGE_KEYS = frozenset({"digest", "layers", "approximate", "note"})
MAX_LAYER_BYTES = 2**50  # also keeps every sum of sizes within the registry's 64-bit integers
_LAYER_KEYS = frozenset({"digest", "size", "uncompressed_size", "note"})

# Synthetic images look like real ones: a few layers, one of them (the base) larger.
SYNTHETIC_MIN_LAYERS = 3
SYNTHETIC_MAX_LAYERS = 8
SYNTHETIC_MIN_BYTES = 5 * 10**6
SYNTHETIC_MAX_BYTES = 400 * 10**6


@dataclass(frozen=True, slots=True)
class CatalogProblem:
    """Why (part of) a catalog was not accepted; the image it concerns is left out."""

    source: str
    image: str
    """The image key as written; empty for a problem with the file as a whole."""
    field: str
    """Where in the entry, e.g. ``layers[2].size``; empty for the entry itself."""
    message: str

    def __str__(self) -> str:
        where = [self.source]
        if self.image:
            where.append(f"image {self.image!r}")
        if self.field:
            where.append(self.field)
        return f"{': '.join(where)}: {self.message}"


@dataclass(frozen=True, slots=True)
class Catalog:
    """Manifests keyed by normalised reference, and the problems met while reading them."""

    images: Mapping[str, ImageManifest] = field(default_factory=lambda: MappingProxyType({}))
    problems: tuple[CatalogProblem, ...] = ()

    def get(self, reference: str) -> ImageManifest | None:
        """The manifest for ``reference`` in any spelling (``nginx`` = ``docker.io/library/nginx:latest``)."""
        normalised = normalize(reference)
        return None if normalised is None else self.images.get(normalised)


def parse_catalog(data: object, source: str = "catalog") -> Catalog:
    """Read a catalog mapping (as ``yaml.safe_load`` returns it); bad entries become problems.

    An image with any problem is left out whole, so a half-read image never skews a simulation.
    """
    problems: list[CatalogProblem] = []

    def problem(image: str, where: str, message: str) -> None:
        problems.append(CatalogProblem(source, image, where, message))

    if data is None:
        return Catalog()
    if not isinstance(data, Mapping):
        problem("", "", f"the catalog must be a mapping with an 'images' key, got {kind_of(data)}")
        return Catalog(problems=tuple(problems))
    for key in data:
        if key not in ("version", "images") and not (isinstance(key, str) and key.startswith("x-")):
            problem("", str(key), "unknown top-level key (expected 'version', 'images' or 'x-…')")
    version = data.get("version", CATALOG_VERSION)
    if version != CATALOG_VERSION or isinstance(version, bool):
        problem("", "version", f"unsupported catalog version {version!r} (this product reads {CATALOG_VERSION})")
        return Catalog(problems=tuple(problems))
    entries = data.get("images", {})
    if entries is None:
        entries = {}
    if not isinstance(entries, Mapping):
        problem("", "images", f"must be a mapping of image reference to manifest, got {kind_of(entries)}")
        return Catalog(problems=tuple(problems))

    images: dict[str, ImageManifest] = {}
    written_as: dict[str, str] = {}
    layer_owner: dict[str, tuple[str, Layer]] = {}
    for raw_key, entry in entries.items():
        key = str(raw_key)
        normalised = normalize(key) if isinstance(raw_key, str) else None
        if normalised is None:
            problem(key, "", "not a valid image reference")
            continue
        if normalised in written_as:
            problem(key, "", f"the same image as {written_as[normalised]!r} (both are {normalised})")
            continue
        written_as[normalised] = key
        before = len(problems)
        report = functools.partial(problem, key)
        manifest = _parse_image(normalised, entry, report)
        if manifest is None or len(problems) > before:
            continue
        if _layers_conflict(key, manifest, layer_owner, report):
            continue
        for layer in manifest.layers:
            layer_owner.setdefault(layer.digest, (key, layer))
        images[normalised] = manifest
    return Catalog(MappingProxyType(images), tuple(problems))


def merge_catalogs(base: Catalog, *overrides: Catalog) -> Catalog:
    """``base`` with each override laid over it in turn: a later catalog's image replaces the whole
    earlier entry for the same normalised reference. Problems of all catalogs are kept."""
    images = dict(base.images)
    problems = list(base.problems)
    for override in overrides:
        images.update(override.images)
        problems.extend(override.problems)
    return Catalog(MappingProxyType(images), tuple(problems))


def manifest_digest(layers: tuple[Layer, ...]) -> str:
    """A stable stand-in manifest digest for an entry that gives none: a hash of its layer digests."""
    joined = "\n".join(layer.digest for layer in layers)
    return "sha256:" + hashlib.sha256(joined.encode()).hexdigest()


def synthetic_manifest(reference: str, seed: int | str = 0) -> ImageManifest:
    """A made-up but realistic manifest for an image no catalog knows (``source="synthetic"``).

    Derived only from a hash of ``seed`` and the normalised reference, so every run and every
    process agrees: 3-8 layers, 5-400 MB compressed (log-uniform, so small and large images are
    both common), the first layer the largest-looking base, 1.8-3.2x compression per layer.
    Synthetic layers are never shared with other images: nothing says which base they would share.
    """
    normalised = normalize(reference) or reference
    draw = _HashDraws(f"{seed}\0{normalised}")
    count = SYNTHETIC_MIN_LAYERS + math.floor(draw() * (SYNTHETIC_MAX_LAYERS - SYNTHETIC_MIN_LAYERS + 1))
    count = min(count, SYNTHETIC_MAX_LAYERS)
    low, high = math.log(SYNTHETIC_MIN_BYTES + 1000), math.log(SYNTHETIC_MAX_BYTES - 1000)
    total = math.exp(low + draw() * (high - low))
    weights = [2.0 + 4.0 * draw()] + [0.05 + 1.5 * draw() for _ in range(count - 1)]
    scale = total / sum(weights)
    layers = []
    for index, weight in enumerate(weights):
        size = max(1, round(weight * scale))
        ratio = 1.8 + 1.4 * draw()
        digest = hashlib.sha256(f"synthetic\0{seed}\0{normalised}\0{index}".encode()).hexdigest()
        layers.append(Layer(digest=f"sha256:{digest}", size=size, uncompressed_size=round(size * ratio)))
    as_tuple = tuple(layers)
    # An image pinned by digest is that manifest: its digest (and so the container's imageID) is the pinned one.
    pinned = normalised.rsplit("@", 1)[1] if "@" in normalised else manifest_digest(as_tuple)
    return ImageManifest(normalised, pinned, as_tuple, source="synthetic")


def manifest_for(catalog: Catalog, reference: str, seed: int | str = 0) -> ImageManifest | None:
    """The catalog's manifest for ``reference``, else a synthetic one; ``None`` for an invalid reference."""
    if normalize(reference) is None:
        return None
    return catalog.get(reference) or synthetic_manifest(reference, seed)


class _HashDraws:
    """Uniform floats in [0, 1) from SHA-256 of a key and a counter: stable across runs and Pythons."""

    def __init__(self, key: str) -> None:
        self._key = key
        self._count = 0

    def __call__(self) -> float:
        block = hashlib.sha256(f"{self._key}\0{self._count}".encode()).digest()
        self._count += 1
        return int.from_bytes(block[:8], "big") / 2**64


def _parse_image(
    reference: str,
    entry: object,
    problem: _Report,
) -> ImageManifest | None:
    if not isinstance(entry, Mapping):
        problem("", f"must be a mapping with 'layers', got {kind_of(entry)}")
        return None
    for key in entry:
        if key not in _IMAGE_KEYS:
            problem(str(key), f"unknown key (expected one of {', '.join(sorted(_IMAGE_KEYS))})")
    approximate = entry.get("approximate", False)
    if not isinstance(approximate, bool):
        problem("approximate", f"must be true or false, got {approximate!r}")
    if "note" in entry and not isinstance(entry["note"], str):
        problem("note", f"must be text, got {kind_of(entry['note'])}")
    raw_layers = entry.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        problem("layers", f"must be a non-empty list of layers, got {kind_of(raw_layers)}")
        return None
    layers: list[Layer] = []
    for index, raw_layer in enumerate(raw_layers):
        layer = _parse_layer(raw_layer, f"layers[{index}]", problem)
        if layer is not None:
            layers.append(layer)
    if len(layers) != len(raw_layers):
        return None
    as_tuple = tuple(layers)
    digest = entry.get("digest")
    if digest is None:
        digest = manifest_digest(as_tuple)
    elif not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        problem("digest", f"must be 'sha256:' and 64 lowercase hex digits, got {digest!r}")
        return None
    return ImageManifest(reference, digest, as_tuple, source="catalog")


def _parse_layer(raw: object, where: str, problem: _Report) -> Layer | None:
    if not isinstance(raw, Mapping):
        problem(where, f"must be a mapping with digest, size and uncompressed_size, got {kind_of(raw)}")
        return None
    ok = True
    for key in raw:
        if key not in _LAYER_KEYS:
            problem(f"{where}.{key}", f"unknown key (expected one of {', '.join(sorted(_LAYER_KEYS))})")
            ok = False
    digest = raw.get("digest")
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        problem(f"{where}.digest", f"must be 'sha256:' and 64 lowercase hex digits, got {digest!r}")
        ok = False
    size = _parse_size(raw.get("size"), f"{where}.size", problem, minimum=1)
    unpacked = _parse_size(raw.get("uncompressed_size"), f"{where}.uncompressed_size", problem, minimum=0)
    if not ok or size is None or unpacked is None or not isinstance(digest, str):
        return None
    return Layer(digest=digest, size=size, uncompressed_size=unpacked)


def _parse_size(value: object, where: str, problem: _Report, minimum: int) -> int | None:
    """Bytes as an integer, or as text with a unit (``39.1 MB``, ``91 MiB``: MB = 10**6 bytes)."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        if match and match.group(2) in _UNITS:
            scaled = float(match.group(1)) * _UNITS[match.group(2)]
            number = round(scaled) if scaled <= MAX_LAYER_BYTES else MAX_LAYER_BYTES + 1  # inf cannot be rounded
    if number is None:
        problem(where, f"must be a number of bytes or a size like '39.1 MB', got {value!r}")
        return None
    if number < minimum:
        problem(where, f"must be at least {minimum} bytes, got {number}")
        return None
    if number > MAX_LAYER_BYTES:
        shown = value if len(str(value)) <= 40 else f"{str(value)[:40]}…"
        problem(
            where,
            f"must be at most {MAX_LAYER_BYTES} bytes (1 PiB; no registry serves a layer that big), got {shown!r}",
        )
        return None
    return number


def _layers_conflict(
    key: str,
    manifest: ImageManifest,
    layer_owner: Mapping[str, tuple[str, Layer]],
    problem: _Report,
) -> bool:
    """A digest names one blob, so a shared layer must have the same sizes everywhere it appears."""
    conflict = False
    for index, layer in enumerate(manifest.layers):
        owner = layer_owner.get(layer.digest)
        if owner is None or owner[0] == key:
            continue
        other_key, other = owner
        if (other.size, other.uncompressed_size) != (layer.size, layer.uncompressed_size):
            problem(
                f"layers[{index}]",
                f"layer {layer.digest[:19]}… is {layer.size}/{layer.uncompressed_size} bytes here but "
                f"{other.size}/{other.uncompressed_size} in {other_key!r}; a digest names one blob",
            )
            conflict = True
    return conflict


def kind_of(value: object) -> str:
    """What a user wrote where something else was expected, for an error message: "list", "an empty dict"."""
    if value is None:
        return "nothing"
    if isinstance(value, list | dict) and not value:
        return f"an empty {type(value).__name__}"
    return type(value).__name__
