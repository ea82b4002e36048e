"""The options of ``mergekit-yaml``, without importing mergekit.

``mergekit.options.add_merge_options`` builds these click options at import time, and
importing it costs torch, transformers and peft (seconds). This static copy needs only
click, so ``fusechat-merge merge --help`` starts at once; mergekit is imported only when
the command runs (`to_merge_options`).

Use `add_mergekit_options` exactly where mergekit's ``add_merge_options`` would go: the
decorated function receives ``merge_options`` (a ``mergekit.options.MergeOptions``) in
place of the option values, as with mergekit's decorator.

This module is written by hand. The options themselves are data, generated from the
installed mergekit by ``tools/gen_mergekit_options.py`` into ``_mergekit_option_table.py``
(one row per option, the fields of `MergekitOption` in order);
``tests/test_mergekit_options.py`` fails while that table differs from mergekit's options.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import click

from fusechat_merge import _mergekit_option_table as _table

if TYPE_CHECKING:
    from mergekit.options import MergeOptions

MERGEKIT_VERSION: str = _table.MERGEKIT_VERSION
"""The mergekit version these options were copied from."""


class ShardSize(click.ParamType):
    """A parameter count with an optional k, m or b suffix (powers of 1000): ``5B``, ``500m``.

    Behaves as mergekit's ``ShardSizeParamType``: integers pass through, a malformed
    value raises ``ValueError`` (not a click usage error), as mergekit's does.
    """

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        if value.isnumeric():
            return int(value)
        scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(value[-1].lower())
        if scale is None:
            raise ValueError(value)
        return int(value[:-1]) * scale


class MergekitOption(NamedTuple):
    """One click option of ``mergekit-yaml``, as mergekit's ``add_merge_options`` adds it."""

    name: str  # the parameter (a ``MergeOptions`` field)
    opts: tuple[str, ...]  # its spellings, e.g. ("--cuda",) or ("--num-threads", "-j")
    secondary_opts: tuple[str, ...]  # the "off" spelling of a --x/--no-x pair
    type: str  # click ParamType.name: boolean, text, integer, float, choice or size
    choices: tuple[str, ...] | None  # for type "choice"
    default: Any
    is_flag: bool
    count: bool  # -v, -vv, ...
    show_default: bool
    help: str | None
    category: str | None  # the section mergekit-yaml's help lists it under

    @property
    def decls(self) -> tuple[str, ...]:
        """The declarations to give ``click.option``: the name, then the spellings."""
        if self.secondary_opts:
            return (self.name, f"{self.opts[0]}/{self.secondary_opts[0]}")
        return (self.name, *self.opts)

    def click_type(self) -> click.ParamType:
        if self.type == "choice":
            return click.Choice(self.choices)
        return {
            "boolean": click.BOOL,
            "text": click.STRING,
            "integer": click.INT,
            "float": click.FLOAT,
            "size": ShardSize(),
        }[self.type]

    def click_option(self) -> Callable[[Callable], Callable]:
        """The ``click.option`` decorator that adds this option."""
        extra: dict[str, Any] = {}
        if self.is_flag:
            extra["is_flag"] = True
        if self.count:
            extra["count"] = True
        return click.option(
            *self.decls,
            type=self.click_type(),
            default=self.default,
            help=self.help,
            show_default=self.show_default,
            **extra,
        )


MERGEKIT_OPTIONS: tuple[MergekitOption, ...] = tuple(
    MergekitOption(*row) for row in _table.MERGEKIT_OPTIONS
)
"""Every option of ``mergekit-yaml`` (``MergeOptions`` fields), in mergekit's order."""

OPTION_NAMES: frozenset[str] = frozenset(o.name for o in MERGEKIT_OPTIONS)


def to_merge_options(kwargs: dict[str, Any]) -> MergeOptions:
    """Pop the ``MergeOptions`` fields out of a command's ``kwargs`` and build one.

    What mergekit's ``add_merge_options`` does before calling the command: every key of
    ``kwargs`` that is a ``MergeOptions`` field is removed from ``kwargs`` (in place), and
    the rest is left for the command. Imports mergekit (and so torch) on first use.
    """
    from mergekit.options import MergeOptions

    values = {name: kwargs.pop(name) for name in MergeOptions.model_fields if name in kwargs}
    try:
        return MergeOptions(**values)
    except Exception:
        print(f"Error creating MergeOptions with args: {values}")
        raise


def add_mergekit_options(func: Callable) -> Callable:
    """Add every ``mergekit-yaml`` option to a click command, as mergekit's
    ``add_merge_options`` does: ``func`` is called with ``merge_options=MergeOptions(...)``
    in place of the option values (and its other arguments untouched).

    Put it below ``@click.command`` and the command's own options, like mergekit's.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs["merge_options"] = to_merge_options(kwargs)
        return func(*args, **kwargs)

    for option in reversed(MERGEKIT_OPTIONS):
        wrapper = option.click_option()(wrapper)
    return wrapper
