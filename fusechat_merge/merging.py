"""Running a mergekit merge safely: checked first, written atomically.

mergekit writes straight into the output directory, so an interrupted merge leaves a
directory with ``config.json`` and some shards that looks like a model. Here the merge
goes to a hidden sibling ``.NAME.partial-XXXX`` and is renamed into place only when
complete; a killed run leaves only the hidden directory behind.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fusechat_merge import METHOD_NAME
from fusechat_merge.merge_recipe import validate_recipe
from fusion.artifacts.atomic import staged_dir

_MERGE_MARKERS = ("mergekit_config.yml", "config.json")


def run_merge_checked(
    raw: Mapping[str, Any],
    out_path: str | os.PathLike[str],
    options: Any = None,
    *,
    config_source: str | None = None,
    source_name: str = "<recipe>",
) -> Path:
    """Check ``raw`` (a recipe mapping), then merge it atomically into ``out_path``.

    ``options`` is a `mergekit.options.MergeOptions` (defaults when None).
    """
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    validate_recipe(raw, source_name)
    config = MergeConfiguration.model_validate(dict(raw))
    return run_merge_atomic(config, out_path, options or MergeOptions(), config_source)


def run_merge_atomic(config, out_path, options, config_source: str | None = None) -> Path:
    """mergekit's ``run_merge`` into a temporary sibling, renamed into place when done."""
    from mergekit import merge as mergekit_merge

    from fusechat_merge.mergekit_adapter import register

    register()
    run_merge = getattr(mergekit_merge.run_merge, "__wrapped__", mergekit_merge.run_merge)
    out = Path(out_path).absolute()
    _check_replaceable(out)
    with staged_dir(out, replace=True) as partial:
        run_merge(config, str(partial), options=options, config_source=config_source)
    return out


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    entries = list(out.iterdir())
    if entries and not any((out / m).exists() for m in _MERGE_MARKERS):
        raise FileExistsError(
            f"output directory {out} is not empty and holds no previous merge "
            "(no mergekit_config.yml or config.json); choose another directory"
        )


def _uses_fusechat_sce(config) -> bool:
    if config.merge_method == METHOD_NAME:
        return True
    modules = config.modules or {}
    return any(getattr(m, "merge_method", None) == METHOD_NAME for m in modules.values())


def wrap_run_merge(run_merge: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap mergekit's ``run_merge`` (by the import hook): ``fusechat_sce`` recipes are
    checked before loading and written atomically; other recipes pass through."""
    if getattr(run_merge, "_fusechat_wrapped", False):
        return run_merge

    @functools.wraps(run_merge)
    def checked_run_merge(merge_config, out_path, options, config_source=None, **kwargs):
        if kwargs or not _uses_fusechat_sce(merge_config):
            return run_merge(merge_config, out_path, options, config_source, **kwargs)
        import yaml

        raw = yaml.safe_load(config_source) if config_source else None
        if not isinstance(raw, dict):
            raw = merge_config.model_dump(exclude_none=True, mode="json")
        validate_recipe(raw, "(mergekit-yaml recipe)")
        run_merge_atomic(merge_config, out_path, options, config_source)
        return None

    checked_run_merge._fusechat_wrapped = True  # type: ignore[attr-defined]
    return checked_run_merge
