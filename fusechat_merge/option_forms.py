"""The two forms of a stage's options, generated from its dataclass (`fusion.options`):
click options for the command line, and a strict pydantic model for the recipe section.

Importing this module is cheap (click, pydantic): the CLI builds its ``--help`` from it
without importing torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
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


def click_options(cls: type, *, exclude: Sequence[str] = (), required: Sequence[str] = ()) -> Callable:
    """A decorator adding one ``--field-name`` option per declared field of ``cls``."""
    hints = _hints(cls)

    def decorate(func: Callable) -> Callable:
        for f in reversed(option_fields(cls, exclude)):
            meta = {"choices": None, **f.metadata, **bounds(f)}
            base = _base_type(hints[f.name])
            flag = "--" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = {"help": meta["help"], "show_default": True}
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
            if typing.get_origin(base) is tuple:  # one comma-separated value on the command line
                func = click.option(flag, f.name, default=None, required=meta["required"],
                                    callback=_comma_separated, **kwargs)(func)
                continue
            if base is bool:
                func = click.option(flag, f.name, is_flag=True, default=f.default, **kwargs)(func)
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
            func = click.option(flag, f.name, default=f.default,
                                required=f.name in required or meta["required"], **kwargs)(func)
        return func

    return decorate


def _comma_separated(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


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


def field_help(cls: type, name: str) -> str:
    """The help text of one field (``TrainingArguments``-style ``metadata['help']`` too)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return str(f.metadata.get("help", ""))
    raise KeyError(name)
