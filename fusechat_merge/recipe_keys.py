"""What both recipe kinds (mergekit merge recipes, pipeline recipes) share: how a YAML key
is named in an error, and where it is in the file."""

from __future__ import annotations

from typing import Any

import yaml


def key_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("merges", 2, "method")`` → ``merges[2].method`` (empty for the top level)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def line_map(text: str) -> dict[tuple[Any, ...], int]:
    """YAML key path → 1-based line, from the composed node tree."""
    lines: dict[tuple[Any, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[Any, ...]) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, child in node.value:
                lines[(*path, key.value)] = key.start_mark.line + 1
                walk(child, (*path, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                walk(child, (*path, i))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines
