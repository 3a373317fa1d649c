"""Loads image catalog files (YAML) into a :class:`~vk_provider.domain.catalog.Catalog`.

The shipped catalog is ``config/images.yaml`` of the checkout (or the path in
``images.catalog``); user files from ``images.extra_catalogs`` are read after it and their entries
replace the shipped ones. A file that cannot be read or parsed is an error naming the file; a bad
entry inside a file is left out and reported as a warning, so one typo does not stop the node
(``strict``, for simulations: an error too).
"""

from __future__ import annotations

import logging
from pathlib import Path

from vk_provider.domain.catalog import Catalog, merge_catalogs, parse_catalog
from vk_provider.yamlfile import YamlFileError, read_yaml

log = logging.getLogger(__name__)
SHIPPED = Path(__file__).resolve().parents[1] / "config" / "images.yaml"


class CatalogError(Exception):
    pass


def load_file(path: str | Path, *, strict: bool = False) -> Catalog:
    """One catalog file. A bad entry is left out with a warning, or with ``strict`` (a simulation,
    whose numbers would quietly use made-up sizes instead) the file is an error listing them all."""
    try:
        data = read_yaml(path, "image catalog")
    except YamlFileError as exc:
        raise CatalogError(str(exc)) from None
    catalog = parse_catalog(data, source=str(path))
    if strict and catalog.problems:
        raise CatalogError("; ".join(str(problem) for problem in catalog.problems))
    for problem in catalog.problems:
        log.warning("image catalog: %s (entry left out)", problem)
    return catalog


def load_catalogs(shipped: str = "", extra: list[str] | None = None, *, strict: bool = False) -> Catalog:
    base_path = Path(shipped) if shipped else SHIPPED
    if shipped or base_path.is_file():
        base = load_file(base_path, strict=strict)
    else:
        log.warning("no shipped image catalog at %s; unknown images follow images.unknown_images", base_path)
        base = parse_catalog({}, source="empty")
    return merge_catalogs(base, *(load_file(p, strict=strict) for p in extra or ()))
