"""Reading a YAML file a user wrote (settings, workloads, image catalogs), with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class YamlFileError(Exception):
    """Why a file could not be read as YAML; the message names the file (and the line, if known)."""


MAX_ALIASED_VALUES = 1_000_000
"""Values a document may repeat through aliases (``*name``), beyond those it writes out: a few
lines of nested aliases can stand for billions of values, which whatever walks them (an error
message quoting one) would never get through."""

_KEY_KINDS = {list: "list", dict: "mapping", set: "set"}


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last, silently),
    a key that is a list or a mapping, and a document whose aliases expand to too many values."""

    def compose_document(self) -> yaml.Node | None:
        node: yaml.Node | None = super().compose_document()
        if node is not None:
            _check_aliases(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged by SafeLoader
                continue
            key = self.construct_object(key_node, deep=deep)
            kind = next((name for cls, name in _KEY_KINDS.items() if isinstance(key, cls)), None)
            if kind is not None:  # `[a, b]: 1`, `? {x: 1}`: Python cannot use it as a key
                raise yaml.constructor.ConstructorError(
                    None, None, f"a mapping key must be a string, number or boolean, not a {kind}", key_node.start_mark
                )
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_aliases(root: yaml.Node) -> None:
    """Refuse a document whose aliases repeat more than :data:`MAX_ALIASED_VALUES` values.

    An alias is the very node of its anchor, so the document is a graph: count each node once with
    what it expands to (a node met again on its own path, a recursive alias, counts once).
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    first_huge: yaml.Node | None = None
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            sizes[key] = size = 1 + sum(sizes.get(id(child), 1) for child in _children(node))
            if first_huge is None and size > MAX_ALIASED_VALUES:
                first_huge = node
            continue
        if key in sizes or key in on_path:
            continue
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in reversed(_children(node)))
    if sizes[id(root)] - len(sizes) > MAX_ALIASED_VALUES:
        raise yaml.composer.ComposerError(
            None,
            None,
            f"aliases (*name) repeat more than {MAX_ALIASED_VALUES} values here; write out what is meant",
            (first_huge or root).start_mark,
        )


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed document of ``path`` (None when empty). ``what`` names the file in errors: "settings file"."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise YamlFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise YamlFileError(f"{what} {path}: not UTF-8 text (at byte {exc.start})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise YamlFileError(f"{what} {path}{where}: {problem}") from None
