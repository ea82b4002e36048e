"""What both recipe kinds (mergekit merge recipes, pipeline recipes) share: how they are
read (a key given twice is an error, not last-wins), how a YAML key is named in an error,
and where it is in the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fusion.errors import InputError


class RecipeFileError(InputError):
    """A recipe file that cannot be read as a YAML mapping. ``where`` is ``<file>`` (it
    cannot be read), ``<yaml>`` (it does not parse) or ``<top level>`` (not a mapping); each
    recipe kind words it as its own error (`merge_recipe.RecipeError`,
    `pipeline_recipe.PipelineRecipeError`), so both say the same thing the same way."""

    def __init__(self, where: str, message: str, path: str | Path) -> None:
        super().__init__(f"{where}: {message}", file=str(path))
        self.where = where
        self.reason = message


def read_recipe_file(path: str | Path, what: str = "a recipe", *, empty_ok: bool = False
                     ) -> tuple[dict[str, Any], str]:
    """The YAML mapping in ``path`` and its text; a key given twice is refused (`load_yaml`).
    ``what`` names the file's kind in the error; ``empty_ok`` reads an empty file as ``{}``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise RecipeFileError("<file>", f"cannot be read: {reason}", path) from err
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as err:
        raise RecipeFileError("<yaml>", str(err), path) from err
    if raw is None and empty_ok:
        return {}, text
    if not isinstance(raw, dict):
        found = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise RecipeFileError("<top level>", f"{what} is a YAML mapping (key: value lines), not {found}", path)
    return raw, text


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


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A mapping that gives one key twice (PyYAML would silently keep the last)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first.setdefault(key, key_node)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if earlier is not key_node:
                raise DuplicateKeyError(
                    problem=f"key {key!r} is given twice, on line {earlier.start_mark.line + 1} and on "
                    f"line {key_node.start_mark.line + 1}; keep one",
                    problem_mark=key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping (both lines named)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
