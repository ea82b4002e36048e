"""The two forms of a stage's options, generated from its dataclass (`fusion.options`):
click options for the command line, and a strict pydantic model for the recipe section.

Importing this module is cheap (click, pydantic): the CLI builds its ``--help`` from it
without importing torch.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

import click
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from fusion.options import bounds, option_fields


def _base_type(annotation: Any) -> Any:
    """``int | None`` → int; ``str`` → str (None when the type is a union of several)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return args[0] if len(args) == 1 else None
    return annotation


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def click_options(cls: type, *, exclude: Sequence[str] = (), required: Sequence[str] = (),
                  aliases: Mapping[str, Sequence[str]] | None = None, overrides: bool = False) -> Callable:
    """A decorator adding one ``--field-name`` option per declared field of ``cls``.

    ``aliases``: more flag names of a field (``{"lm_weight": ["--lambda"]}``). ``overrides``:
    every option defaults to None (not given), so that it overrides another source of the
    value only when given; the help still shows the field's default."""
    hints = _hints(cls)
    aliases = aliases or {}

    def decorate(func: Callable) -> Callable:
        for f in reversed(option_fields(cls, exclude)):
            meta = {"choices": None, **f.metadata, **bounds(f)}
            base = _base_type(hints[f.name])
            flag = [*aliases.get(f.name, ()), "--" + f.name.replace("_", "-")]
            kwargs: dict[str, Any] = {"help": meta["help"], "show_default": True}
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
            if typing.get_origin(base) is tuple:  # one comma-separated value on the command line
                func = click.option(*flag, f.name, default=None, required=meta["required"],
                                    callback=_comma_separated, **kwargs)(func)
                continue
            if typing.get_origin(base) is dict:  # KEY=VALUE,KEY=VALUE, each value read as YAML
                func = click.option(*flag, f.name, default=None, required=meta["required"],
                                    callback=_key_values, **{**kwargs, "show_default": False})(func)
                continue
            if base is bool:  # overrides: None when not given, as every other option
                if overrides:
                    kwargs["show_default"] = str(f.default)
                func = click.option(*flag, f.name, is_flag=True, default=None if overrides else f.default,
                                    **kwargs)(func)
                continue
            if meta["choices"]:
                kwargs["type"] = click.Choice([str(c) for c in meta["choices"]])
            elif base is int:
                kwargs["type"] = click.IntRange(_num(meta["min"]), _num(meta["max"]),
                                                min_open=meta["min_open"])
            elif base is float:
                kwargs["type"] = click.FloatRange(meta["min"], meta["max"], min_open=meta["min_open"])
            if f.default is None:
                kwargs["show_default"] = False
            elif overrides:
                kwargs["show_default"] = str(f.default)
            func = click.option(*flag, f.name, default=None if overrides else f.default,
                                required=f.name in required or meta["required"], **kwargs)(func)
        return func

    return decorate


def _comma_separated(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def _key_values(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any] | None:
    """``"a=1,b=true,c=fp8"`` → ``{"a": 1, "b": True, "c": "fp8"}`` (None when not given)."""
    import yaml

    if not value:
        return None
    pairs = [item.partition("=") for item in value.split(",") if item.strip()]
    bad = [key for key, sep, _ in pairs if not sep or not key.strip()]
    if bad:
        raise click.BadParameter(f"expected KEY=VALUE,KEY=VALUE; {bad[0]!r} has no KEY=")
    return {key.strip(): yaml.safe_load(text.strip()) if text.strip() else None for key, _, text in pairs}


def _num(value: float | None) -> int | None:
    return None if value is None else int(value)


def recipe_section(cls: type, *, exclude: Sequence[str] = (), name: str | None = None) -> type[BaseModel]:
    """A frozen pydantic model (unknown keys refused) with ``cls``'s declared fields."""
    hints = _hints(cls)
    fields: dict[str, Any] = {}
    for f in option_fields(cls, exclude):
        meta = {"choices": None, **f.metadata, **bounds(f)}
        annotation = hints[f.name]
        if meta["choices"]:
            annotation = Literal[tuple(meta["choices"])]  # type: ignore[valid-type]
            if f.default is None:
                annotation = annotation | None
            if {"on", "off"} <= set(meta["choices"]):
                annotation = Annotated[annotation, BeforeValidator(_switch_word)]
        limits: dict[str, Any] = {}
        if meta["min"] is not None:
            limits["gt" if meta["min_open"] else "ge"] = meta["min"]
        if meta["max"] is not None:
            limits["le"] = meta["max"]
        fields[f.name] = (annotation, Field(f.default, description=meta["help"], **limits))
    return create_model(name or f"{cls.__name__}Section",
                        __config__=ConfigDict(extra="forbid", frozen=True), **fields)


def _switch_word(value: Any) -> Any:
    """YAML reads an unquoted ``on``/``off`` as a boolean: give it back as the word."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
