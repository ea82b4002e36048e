"""Checks a mergekit merge recipe before any model is loaded.

mergekit 0.1.5 only reports an unknown method after downloading every model (its
issue #527), silently drops unknown YAML keys and parameters, silently ignores shared
parameters given per model (``select_topk`` under one model), and finds mismatched
vocabularies only while merging. Every problem found here names the YAML key at fault,
all at once.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fusechat_merge.merge_parameters import (
    MERGEKIT_FORM,
    PIPELINE_FORM,
    find_method,
    missing_message,
    missing_required,
    need_of,
    parameter_problems,
)
from fusechat_merge.recipe_keys import (
    RecipeFileError,
    key_path,
    line_map,
    read_recipe_file,
)
from fusion.errors import InputError, did_you_mean
from fusion.names import HUB, MISSING, joined, local_path, model_problem, resolve, split_ref


@dataclass(frozen=True)
class RecipeProblem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class RecipeError(InputError):
    """A recipe that cannot be merged; ``problems`` lists every reason.

    A `fusion.errors.FusionError`: our command line prints it and exits 1, no traceback
    (stock ``mergekit-yaml`` through the import hook too: `merging.wrap_run_merge`).
    """

    def __init__(self, source: str, problems: list[RecipeProblem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid merge recipe {source}:\n{lines}", file=source,
                         key=problems[0].key if len(problems) == 1 else None)


_VOCAB_KEYS = ("vocab_size",)
# The pipeline merge's key for what lacks a required parameter (`merge_parameters.need_of`).
_PIPELINE_KEYS = {"shared": "parameters", "base": "base", "each": "model_parameters"}


def load_recipe(path: str | Path) -> tuple[dict[str, Any], str]:
    """Read a YAML recipe; returns (mapping, source text). Errors name the file."""
    try:
        return read_recipe_file(path)
    except RecipeFileError as problem:
        raise RecipeError(str(path), [RecipeProblem(problem.where, problem.reason)]) from problem


def check_recipe(
    raw: Mapping[str, Any], *, base_dir: str | Path | None = None, need_models: bool = False,
    text: str | None = None,
) -> list[RecipeProblem]:
    """Every problem of a recipe, without loading tensors (configs are read); ``text``, the
    recipe's YAML, lets a problem name its lines.

    Relative model paths are resolved against ``base_dir`` (default: the working
    directory, as mergekit does). Hub ids are read from the Hugging Face cache when
    cached; with ``need_models`` (a merge is about to run), a hub id that can be neither
    read from the cache nor downloaded (``HF_HUB_OFFLINE``) is a problem too.
    """
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    problems: list[RecipeProblem] = []
    known_keys = set(MergeConfiguration.model_fields)
    for key in raw:
        if key not in known_keys:
            hint = did_you_mean(str(key), known_keys)
            problems.append(RecipeProblem(str(key), f"unknown key{hint}: mergekit would ignore it"))

    try:
        MergeConfiguration.model_validate(dict(raw))
    except ValidationError as err:
        for e in err.errors():
            key = key_path(e["loc"]) or "<top level>"
            problems.append(RecipeProblem(key, e["msg"]))

    method_name = raw.get("merge_method")
    method, unknown = find_method(method_name) if isinstance(method_name, str) else (None, None)
    if unknown:
        problems.append(RecipeProblem("merge_method", unknown))
    if method is not None:
        problems += [RecipeProblem(key, message) for key, message in parameter_problems(_parameter_blocks(raw), method)]
        problems += [RecipeProblem(key, missing_message(method_name, parameter, need_of(key), MERGEKIT_FORM))
                     for key, parameter in missing_required(raw, method)]
    base = Path(base_dir) if base_dir else Path.cwd()
    problems.extend(_duplicate_models(raw, base, _lines(text)))
    problems.extend(_check_models(raw, base, need_models))
    return problems


def _lines(text: str | None) -> dict[tuple[Any, ...], int]:
    if not text:
        return {}
    try:
        return line_map(text)
    except yaml.YAMLError:
        return {}


def _duplicate_models(raw: Mapping[str, Any], base_dir: Path, lines: Mapping[tuple[Any, ...], int]) -> list[RecipeProblem]:
    """A model listed twice among the inputs of one merge (the same directory or hub id and
    revision, however spelt): mergekit stops with "Duplicate merge inputs" after loading."""
    problems: list[RecipeProblem] = []
    for place, node, role in _places(raw):
        if role not in ("recipe", "module", "slice"):
            continue
        group, field = ("sources" if role == "slice" else "models"), "model"
        seen: dict[tuple[str, str | None], tuple[str, tuple[Any, ...]]] = {}
        for i, entry in enumerate(_as_list(node.get(group))):
            ref = entry.get(field) if isinstance(entry, Mapping) else None
            if not isinstance(ref, str):
                continue
            path, revision = split_ref(ref)
            local = local_path(path, base_dir)
            identity = (os.path.normpath(local.absolute()) if local.exists() else path, revision)
            key = f"{_key(place, group)}[{i}].{field}"
            loc = (*_loc(place), group, i, field)
            if identity in seen:
                first, first_loc = seen[identity]
                where = _line_words(lines.get(first_loc), lines.get(loc))
                problems.append(RecipeProblem(key, f"{ref!r} is already an input of this merge ({first}{where}); "
                                                   "list each model once (mergekit refuses duplicate merge inputs)"))
            else:
                seen[identity] = (key, loc)
    return problems


def _loc(place: str) -> tuple[Any, ...]:
    """``modules.x.slices[1]`` → ``("modules", "x", "slices", 1)`` (a `line_map` path)."""
    loc: list[Any] = []
    for part in filter(None, re.split(r"\.|\[(\d+)\]", place)):
        loc.append(int(part) if part.isdigit() else part)
    return tuple(loc)


def _line_words(first: int | None, second: int | None) -> str:
    return f"; lines {first} and {second}" if first and second else ""


def check_merge_settings(
    method_name: str,
    parameters: Mapping[str, Any],
    model_parameters: Mapping[str, Any],
    *,
    base: bool,
    n_models: int,
) -> list[tuple[tuple[str, ...], str]]:
    """Problems of one merge of a pipeline recipe, before its models exist: the method, its
    shared and per-model parameters. Returns ``(key path within the merge, message)``."""
    method, unknown = find_method(method_name)
    if unknown:
        return [(("method",), unknown)]
    entry = {"parameters": dict(model_parameters)} if model_parameters else {}
    # as the pipeline writes it (`pipeline.jobs.MergeJob`): with a base, the pivot is listed first
    raw: dict[str, Any] = {"merge_method": method_name, "models": ([{"model": "pivot"}] if base else [])
                           + [{"model": f"target-{i}", **entry} for i in range(n_models)]}
    if base:
        raw["base_model"] = "pivot"
    if parameters:
        raw["parameters"] = dict(parameters)
    found = []
    for key, message in parameter_problems(_parameter_blocks(raw), method):
        where = ("parameters", *key.split(".")[1:]) if key.startswith("parameters") else (
            "model_parameters", *key.split(".")[2:])
        found.append((where, message))
    for need, parameter in dict.fromkeys((need_of(k, pivot_first=base), p) for k, p in missing_required(raw, method)):
        found.append(((_PIPELINE_KEYS[need],), missing_message(method_name, parameter, need, PIPELINE_FORM)))
    return found


def validate_recipe(
    raw: Mapping[str, Any], source: str, *, base_dir: str | Path | None = None, need_models: bool = True,
    text: str | None = None,
) -> None:
    """Raise `RecipeError` listing every problem, if any (before a merge: ``need_models``)."""
    problems = check_recipe(raw, base_dir=base_dir, need_models=need_models, text=text)
    if problems:
        raise RecipeError(source, problems)


def _places(raw: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any], str]]:
    """(key, mapping, role) of every place of a recipe that names models or parameters, in
    recipe order: ``recipe`` (the top level, key ""), then its ``model`` entries, ``slice``s
    and their ``source``s, then each ``module`` (``modules.NAME``) with its own."""
    def models_and_slices(prefix: str, node: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any], str]]:
        for i, model in enumerate(_as_list(node.get("models"))):
            if isinstance(model, Mapping):
                yield f"{prefix}models[{i}]", model, "model"
        for i, sl in enumerate(_as_list(node.get("slices"))):
            if not isinstance(sl, Mapping):
                continue
            yield f"{prefix}slices[{i}]", sl, "slice"
            for j, src in enumerate(_as_list(sl.get("sources"))):
                if isinstance(src, Mapping):
                    yield f"{prefix}slices[{i}].sources[{j}]", src, "source"

    yield "", raw, "recipe"
    yield from models_and_slices("", raw)
    modules = raw.get("modules")
    if isinstance(modules, Mapping):
        for name, module in modules.items():
            if isinstance(module, Mapping):
                yield f"modules.{name}", module, "module"
                yield from models_and_slices(f"modules.{name}.", module)


def _key(place: str, name: str) -> str:
    return f"{place}.{name}" if place else name


def _parameter_blocks(raw: Mapping[str, Any]) -> Iterator[tuple[str, Any, bool]]:
    """(key, parameters mapping, per_model) for every ``parameters:`` in the recipe."""
    for place, node, role in _places(raw):
        yield _key(place, "parameters"), node.get("parameters"), role in ("model", "source")


def _model_refs(raw: Mapping[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    """(key, reference, the layer_range it is read with, if any) of every model the recipe
    names (modules' own base models aside, as mergekit reads them)."""
    refs = {"recipe": "base_model", "model": "model", "slice": "base_model", "source": "model"}
    for place, node, role in _places(raw):
        if role in refs:
            yield _key(place, refs[role]), node.get(refs[role]), node.get("layer_range") if role == "source" else None
    source = raw.get("tokenizer_source")
    if isinstance(source, str) and source not in ("union", "base"):
        yield "tokenizer_source", source, None


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _check_models(raw: Mapping[str, Any], base_dir: Path, need_models: bool) -> list[RecipeProblem]:
    problems: list[RecipeProblem] = []
    vocab: dict[str, tuple[str, int]] = {}
    for key, ref, layer_range in _model_refs(raw):
        if ref is None:
            continue
        if not isinstance(ref, str):
            continue  # reported by schema validation
        found = resolve(ref, base_dir)
        problem = found.problem()
        if problem is not None and (found.kind == MISSING or need_models):
            problems.append(RecipeProblem(key, problem))
            continue
        if found.kind == HUB or found.path is None:
            continue  # a hub id that is not cached: mergekit downloads it
        local = found.path
        problem = model_problem(local, weights=key != "tokenizer_source")
        if problem is not None:
            problems.append(RecipeProblem(key, f"model path {local}{joined(problem)}"))
            continue
        if key == "tokenizer_source":
            continue
        config = local / "config.json"
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            problems.append(RecipeProblem(key, f"cannot read {config}: {err}"))
            continue
        layers = _layer_range_problem(layer_range, cfg, str(local))
        if layers is not None:
            problems.append(RecipeProblem(key.removesuffix(".model") + ".layer_range", layers))
        size = _vocab_size(cfg)
        if size is not None:
            vocab.setdefault(ref, (key, size))
    has_tokenizer = raw.get("tokenizer") is not None or raw.get("tokenizer_source") is not None
    sizes = {size for _, size in vocab.values()}
    if len(sizes) > 1 and not has_tokenizer:
        listing = ", ".join(f"{key}={size}" for key, size in vocab.values())
        problems.append(
            RecipeProblem(
                "tokenizer",
                f"the models' vocabularies differ ({listing}); set `tokenizer: {{source: union}}` "
                "(or `tokenizer_source: base`) so mergekit aligns the embeddings",
            )
        )
    return problems


def _layer_range_problem(layer_range: Any, cfg: Mapping[str, Any], model: str) -> str | None:
    """Why ``layer_range`` ([start, end), as mergekit reads it) does not fit the model."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), Mapping) else cfg
    layers = text.get("num_hidden_layers", cfg.get("num_hidden_layers"))
    if not (isinstance(layer_range, list | tuple) and len(layer_range) == 2 and isinstance(layers, int)
            and all(isinstance(x, int) for x in layer_range)):
        return None  # no range, or one the schema check reports
    start, end = layer_range
    if 0 <= start < end <= layers:
        return None
    return (f"{list(layer_range)} does not fit {model!r}, which has {layers} layers "
            f"(num_hidden_layers): use 0 <= start < end <= {layers}")


def _vocab_size(cfg: Mapping[str, Any]) -> int | None:
    for key in _VOCAB_KEYS:
        if isinstance(cfg.get(key), int):
            return cfg[key]
    text = cfg.get("text_config")
    if isinstance(text, Mapping) and isinstance(text.get("vocab_size"), int):
        return text["vocab_size"]
    return None
