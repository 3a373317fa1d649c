"""Reading a YAML file a user wrote (settings, workloads, image catalogs), with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class YamlFileError(Exception):
    """Why a file could not be read as YAML; the message names the file (and the line, if known)."""


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed document of ``path`` (None when empty). ``what`` names the file in errors: "settings file"."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise YamlFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise YamlFileError(f"{what} {path}: not UTF-8 text (at byte {exc.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise YamlFileError(f"{what} {path}{where}: {problem}") from None
