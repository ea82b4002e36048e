"""Checks a mergekit merge recipe before any model is loaded.

mergekit 0.1.5 only reports an unknown method after downloading every model (its
issue #527), silently drops unknown YAML keys and parameters, silently ignores shared
parameters given per model (``select_topk`` under one model), and finds mismatched
vocabularies only while merging. Every problem found here names the YAML key at fault,
all at once.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from fusechat_merge.recipe_keys import key_path, load_yaml
from fusion.model_refs import (
    cached_snapshot,
    hub_unreachable,
    local_path,
    names_hub_model,
    not_cached,
    split_ref,
)


@dataclass(frozen=True)
class RecipeProblem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class RecipeError(click.ClickException, ValueError):
    """A recipe that cannot be merged; ``problems`` lists every reason.

    A `click.ClickException` too, so that a command line (ours, or stock
    ``mergekit-yaml`` through the import hook) prints it and exits 1, no traceback.
    """

    def __init__(self, source: str, problems: list[RecipeProblem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid merge recipe {source}:\n{lines}")


_VOCAB_KEYS = ("vocab_size",)


def load_recipe(path: str | Path) -> tuple[dict[str, Any], str]:
    """Read a YAML recipe; returns (mapping, source text). Errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RecipeError(str(path), [RecipeProblem("<file>", str(err))]) from err
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as err:
        raise RecipeError(str(path), [RecipeProblem("<yaml>", str(err))]) from err
    if not isinstance(raw, dict):
        raise RecipeError(
            str(path), [RecipeProblem("<top level>", "a recipe is a YAML mapping")]
        )
    return raw, text


def check_recipe(
    raw: Mapping[str, Any], *, base_dir: str | Path | None = None, need_models: bool = False
) -> list[RecipeProblem]:
    """Every problem of a recipe, without loading tensors (configs are read).

    Relative model paths are resolved against ``base_dir`` (default: the working
    directory, as mergekit does). Hub ids are read from the Hugging Face cache when
    cached; with ``need_models`` (a merge is about to run), a hub id that can be neither
    read from the cache nor downloaded (``HF_HUB_OFFLINE``) is a problem too.
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import registry
    from pydantic import ValidationError

    from fusechat_merge.mergekit_adapter import register

    register()
    problems: list[RecipeProblem] = []
    known_keys = set(MergeConfiguration.model_fields)
    for key in raw:
        if key not in known_keys:
            hint = _did_you_mean(str(key), known_keys)
            problems.append(RecipeProblem(str(key), f"unknown key (mergekit would ignore it){hint}"))

    try:
        MergeConfiguration.model_validate(dict(raw))
    except ValidationError as err:
        for e in err.errors():
            key = key_path(e["loc"]) or "<top level>"
            problems.append(RecipeProblem(key, e["msg"]))

    method_name = raw.get("merge_method")
    method = None
    if isinstance(method_name, str):
        try:
            method = registry.get(method_name)
        except RuntimeError:
            names = [m.spec.name for m in registry.registered_methods()]
            hint = _did_you_mean(method_name, names)
            problems.append(
                RecipeProblem("merge_method", f"unknown merge method {method_name!r}{hint}")
            )
    if method is not None:
        problems.extend(_check_parameters(raw, method))
        problems.extend(_missing_required(raw, method))
    problems.extend(_check_models(raw, Path(base_dir) if base_dir else Path.cwd(), need_models))
    return problems


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
    from mergekit.merge_methods import registry

    from fusechat_merge.mergekit_adapter import register

    register()
    try:
        method = registry.get(method_name)
    except RuntimeError:
        names = [m.spec.name for m in registry.registered_methods()]
        return [(("method",), f"mergekit knows no merge method {method_name!r}{_did_you_mean(method_name, names)}")]
    entry = {"parameters": dict(model_parameters)} if model_parameters else {}
    # as the pipeline writes it (`pipeline.jobs.MergeJob`): with a base, the pivot is listed first
    raw: dict[str, Any] = {"merge_method": method_name, "models": ([{"model": "pivot"}] if base else [])
                           + [{"model": f"target-{i}", **entry} for i in range(n_models)]}
    if base:
        raw["base_model"] = "pivot"
    if parameters:
        raw["parameters"] = dict(parameters)
    found = []
    for problem in _check_parameters(raw, method):
        key = problem.key
        where = ("parameters", *key.split(".")[1:]) if key.startswith("parameters") else (
            "model_parameters", *key.split(".")[2:])
        found.append((where, problem.message))
    for key, parameter in dict.fromkeys(_pipeline_key(k, base) + (p,) for k, p in missing_required(raw, method)):
        if key == "base":
            message = (f"{method_name} needs {parameter!r} for the pivot too, which `base: true` merges as an "
                       f"input; set base: false or give parameters.{parameter}")
        elif key == "parameters":
            message = f"{method_name} needs the parameter {parameter!r}"
        else:
            message = (f"{method_name} needs {parameter!r} for each target (model_parameters.{parameter} or "
                       f"parameters.{parameter})")
        found.append(((key,), message))
    return found


def _pipeline_key(key: str, base: bool) -> tuple[str]:
    """The pipeline merge's key for a `missing_required` key (with a base, the pivot is
    listed as models[0], so ``base_model`` never comes up)."""
    if key == "parameters":
        return ("parameters",)
    return ("base",) if base and key == "models[0].parameters" else ("model_parameters",)


def validate_recipe(
    raw: Mapping[str, Any], source: str, *, base_dir: str | Path | None = None, need_models: bool = True
) -> None:
    """Raise `RecipeError` listing every problem, if any (before a merge: ``need_models``)."""
    problems = check_recipe(raw, base_dir=base_dir, need_models=need_models)
    if problems:
        raise RecipeError(source, problems)


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _parameter_blocks(raw: Mapping[str, Any]) -> Iterator[tuple[str, Any, bool]]:
    """(key, parameters mapping, per_model) for every ``parameters:`` in the recipe."""
    yield "parameters", raw.get("parameters"), False

    def models_and_slices(prefix: str, node: Mapping[str, Any]) -> Iterator[tuple[str, Any, bool]]:
        for i, model in enumerate(_as_list(node.get("models"))):
            if isinstance(model, Mapping):
                yield f"{prefix}models[{i}].parameters", model.get("parameters"), True
        for i, sl in enumerate(_as_list(node.get("slices"))):
            if not isinstance(sl, Mapping):
                continue
            yield f"{prefix}slices[{i}].parameters", sl.get("parameters"), False
            for j, src in enumerate(_as_list(sl.get("sources"))):
                if isinstance(src, Mapping):
                    yield f"{prefix}slices[{i}].sources[{j}].parameters", src.get("parameters"), True

    yield from models_and_slices("", raw)
    modules = raw.get("modules")
    if isinstance(modules, Mapping):
        for name, module in modules.items():
            if isinstance(module, Mapping):
                yield f"modules.{name}.parameters", module.get("parameters"), False
                yield from models_and_slices(f"modules.{name}.", module)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _check_parameters(raw: Mapping[str, Any], method) -> list[RecipeProblem]:
    from mergekit.merge_methods.base import ParameterScope

    specs = {p.name: p for p in method.spec.parameters}
    name = method.spec.name
    problems: list[RecipeProblem] = []
    for key, params, per_model in _parameter_blocks(raw):
        if params is None:
            continue
        if not isinstance(params, Mapping):
            problems.append(RecipeProblem(key, "must be a mapping of parameter names to values"))
            continue
        for pname, setting in params.items():
            pkey = f"{key}.{pname}"
            spec = specs.get(pname)
            if spec is None:
                known = ", ".join(sorted(specs)) or "none"
                hint = _did_you_mean(str(pname), specs)
                problems.append(
                    RecipeProblem(
                        pkey,
                        f"{name} has no parameter {pname!r} (mergekit would silently ignore it; "
                        f"known: {known}){hint}",
                    )
                )
                continue
            if per_model and spec.scope == ParameterScope.SHARED:
                problems.append(
                    RecipeProblem(
                        pkey,
                        f"{pname!r} is a shared parameter of {name}: mergekit ignores it per "
                        "model. Move it to the top-level `parameters:`",
                    )
                )
                continue
            for value in _setting_values(setting):
                try:
                    spec.validate(value)
                except Exception as err:  # pydantic ValidationError or our ValueError
                    problems.append(RecipeProblem(pkey, _first_line_error(err)))
                    break
    return problems


def _missing_required(raw: Mapping[str, Any], method) -> list[RecipeProblem]:
    """Required parameters without a value, for a recipe of plain ``models:`` (mergekit
    raises them mid-merge, as a bare RuntimeError)."""
    name = method.spec.name
    problems = []
    for key, parameter in missing_required(raw, method):
        if key == "parameters":
            message = f"{name} needs the parameter {parameter!r}"
        elif key == "base_model":
            message = (f"{name} merges the base model as an input too and needs its {parameter!r}: list it "
                       f"under models with parameters.{parameter}, or give a top-level parameters.{parameter}")
        else:
            message = f"{name} needs {parameter!r} for each model (or a top-level parameters.{parameter})"
        problems.append(RecipeProblem(key, message))
    return problems


def missing_required(raw: Mapping[str, Any], method) -> list[tuple[str, str]]:
    """(key, parameter) of each required parameter without a value: ``parameters`` (a
    shared one), ``models[i].parameters`` or ``base_model``. A top-level ``parameters:``
    value serves every model; mergekit appends a ``base_model`` that is not listed among
    the models as an input without parameters, so an input-scope parameter (linear's
    ``weight``) needs it too. Slices and modules are left to mergekit."""
    from mergekit.merge_methods.base import ParameterScope

    if raw.get("slices") or raw.get("modules") or not isinstance(raw.get("models"), list):
        return []
    shared = raw.get("parameters") if isinstance(raw.get("parameters"), Mapping) else {}
    base = raw.get("base_model")
    models = [m for m in raw["models"] if isinstance(m, Mapping)]
    listed = base is not None and any(str(m.get("model")) == str(base) for m in models)
    missing: list[tuple[str, str]] = []
    for spec in method.spec.parameters:
        if not spec.required or spec.name in shared:
            continue
        if spec.scope == ParameterScope.SHARED:
            missing.append(("parameters", spec.name))
            continue
        for i, model in enumerate(models):
            own = model.get("parameters") if isinstance(model.get("parameters"), Mapping) else {}
            is_base = base is not None and str(model.get("model")) == str(base)
            if spec.name not in own and not (is_base and spec.scope == ParameterScope.NON_BASE):
                missing.append((f"models[{i}].parameters", spec.name))
        if base is not None and not listed and spec.scope == ParameterScope.INPUT:
            missing.append(("base_model", spec.name))
    return missing


def _setting_values(setting: Any) -> list[Any]:
    """Scalars of a parameter setting: a value, a gradient list, or {filter, value} items."""
    items = setting if isinstance(setting, list) else [setting]
    values: list[Any] = []
    for item in items:
        if isinstance(item, Mapping) and "value" in item:
            inner = item["value"]
            values.extend(inner if isinstance(inner, list) else [inner])
        else:
            values.append(item)
    return values


def _first_line_error(err: Exception) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        msgs = [e.get("msg", "") for e in errors()]
        return "; ".join(m.removeprefix("Value error, ") for m in msgs)
    return str(err)


def _model_refs(raw: Mapping[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    """(key, model reference, the layer_range it is read with, if any) of every model."""
    yield "base_model", raw.get("base_model"), None

    def walk(prefix: str, node: Mapping[str, Any]) -> Iterator[tuple[str, Any, Any]]:
        for i, model in enumerate(_as_list(node.get("models"))):
            if isinstance(model, Mapping):
                yield f"{prefix}models[{i}].model", model.get("model"), None
        for i, sl in enumerate(_as_list(node.get("slices"))):
            if not isinstance(sl, Mapping):
                continue
            yield f"{prefix}slices[{i}].base_model", sl.get("base_model"), None
            for j, src in enumerate(_as_list(sl.get("sources"))):
                if isinstance(src, Mapping):
                    yield f"{prefix}slices[{i}].sources[{j}].model", src.get("model"), src.get("layer_range")

    yield from walk("", raw)
    modules = raw.get("modules")
    if isinstance(modules, Mapping):
        for name, module in modules.items():
            if isinstance(module, Mapping):
                yield from walk(f"modules.{name}.", module)
    source = raw.get("tokenizer_source")
    if isinstance(source, str) and source not in ("union", "base"):
        yield "tokenizer_source", source, None


def resolve_model_ref(
    ref: str, base_dir: Path, cache_dir: str | None = None
) -> tuple[Path | None, str | None]:
    """(local directory, problem) for a model reference.

    A local path is returned as is (the problem says when it does not exist). A hub id
    is looked up in the Hugging Face cache: its snapshot directory when cached; when it
    is not, an unreachable hub is a problem, a reachable one (None, None) leaves it to mergekit.
    """
    path, revision = split_ref(ref)
    candidate = local_path(path, base_dir)
    if candidate.exists():
        return candidate, None
    if not names_hub_model(ref, base_dir):
        return candidate, f"model path {str(candidate)!r} does not exist"
    snapshot = cached_snapshot(path, revision, cache_dir)
    if snapshot is not None:
        return snapshot, None
    why = hub_unreachable()
    return None, (None if why is None else not_cached(ref, why))


def _check_models(raw: Mapping[str, Any], base_dir: Path, need_models: bool) -> list[RecipeProblem]:
    problems: list[RecipeProblem] = []
    vocab: dict[str, tuple[str, int]] = {}
    for key, ref, layer_range in _model_refs(raw):
        if ref is None:
            continue
        if not isinstance(ref, str):
            continue  # reported by schema validation
        local, problem = resolve_model_ref(ref, base_dir)
        if problem is not None and (local is not None or need_models):
            problems.append(RecipeProblem(key, problem))
            continue
        if local is None:
            continue  # a hub id that is not cached: mergekit downloads it
        if not local.is_dir():
            problems.append(RecipeProblem(key, f"model path {str(local)!r} is not a directory"))
            continue
        config = local / "config.json"
        if not config.is_file():
            problems.append(RecipeProblem(key, f"{str(local)!r} has no config.json"))
            continue
        if key == "tokenizer_source":
            continue
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
