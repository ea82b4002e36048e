"""Checks a mergekit merge recipe before any model is loaded.

mergekit 0.1.5 only reports an unknown method after downloading every model (its
issue #527), silently drops unknown YAML keys and parameters, silently ignores shared
parameters given per model (``select_topk`` under one model), and finds mismatched
vocabularies only while merging. Every problem found here names the YAML key at fault,
all at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from fusechat_merge.model_refs import cached_snapshot, hub_offline, names_hub_model, split_ref
from fusechat_merge.recipe_keys import key_path
from fusion.hints import did_you_mean


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
        raw = yaml.safe_load(text)
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
            hint = did_you_mean(str(key), known_keys)
            problems.append(RecipeProblem(str(key), f"unknown key{hint}: mergekit would ignore it"))

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
            hint = did_you_mean(method_name, names)
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
        return [(("method",), f"mergekit knows no merge method {method_name!r}{did_you_mean(method_name, names)}")]
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
    for need, parameter in dict.fromkeys((_need(k, pivot_first=base), p) for k, p in missing_required(raw, method)):
        found.append(((_PIPELINE_KEYS[need],), _missing_message(method_name, parameter, need, _PIPELINE_FORM)))
    return found


def validate_recipe(
    raw: Mapping[str, Any], source: str, *, base_dir: str | Path | None = None, need_models: bool = True
) -> None:
    """Raise `RecipeError` listing every problem, if any (before a merge: ``need_models``)."""
    problems = check_recipe(raw, base_dir=base_dir, need_models=need_models)
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


def _model_refs(raw: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(key, reference) of every model the recipe names (modules' own base models aside, as
    mergekit reads them)."""
    refs = {"recipe": "base_model", "model": "model", "slice": "base_model", "source": "model"}
    for place, node, role in _places(raw):
        if role in refs:
            yield _key(place, refs[role]), node.get(refs[role])
    source = raw.get("tokenizer_source")
    if isinstance(source, str) and source not in ("union", "base"):
        yield "tokenizer_source", source


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
                hint = did_you_mean(str(pname), specs)
                problems.append(
                    RecipeProblem(
                        pkey,
                        f"{name} has no parameter {pname!r}{hint}: mergekit would silently ignore it "
                        f"(known: {known})",
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


# How each recipe form names what needs a missing parameter, and how to give it ({p}).
_MERGEKIT_FORM = {
    "base": ("the base model too, which it merges as an input",
             "list it under models with parameters.{p}, or give a top-level parameters.{p}"),
    "each": ("each model", "or a top-level parameters.{p}"),
}
_PIPELINE_FORM = {
    "base": ("the pivot too, which `base: true` merges as an input", "set base: false or give parameters.{p}"),
    "each": ("each target", "model_parameters.{p} or parameters.{p}"),
}
_PIPELINE_KEYS = {"shared": "parameters", "base": "base", "each": "model_parameters"}


def _missing_message(method: str, parameter: str, need: str, form: Mapping[str, tuple[str, str]]) -> str:
    """The message of a required parameter without a value; ``need`` is what lacks it:
    ``shared`` (the merge), ``base`` or ``each`` (model), named as ``form`` names them."""
    if need == "shared":
        return f"{method} needs the parameter {parameter!r}"
    who, fix = form[need]
    return f"{method} needs {parameter!r} for {who} ({fix.format(p=parameter)})"


def _need(key: str, *, pivot_first: bool = False) -> str:
    """What a `missing_required` key stands for (``pivot_first``: the pipeline lists its
    pivot as models[0] when it merges it as the base)."""
    if key == "parameters":
        return "shared"
    return "base" if key == "base_model" or (pivot_first and key == "models[0].parameters") else "each"


def _missing_required(raw: Mapping[str, Any], method) -> list[RecipeProblem]:
    """Required parameters without a value, for a recipe of plain ``models:`` (mergekit
    raises them mid-merge, as a bare RuntimeError)."""
    return [RecipeProblem(key, _missing_message(method.spec.name, parameter, _need(key), _MERGEKIT_FORM))
            for key, parameter in missing_required(raw, method)]


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


def resolve_model_ref(
    ref: str, base_dir: Path, cache_dir: str | None = None
) -> tuple[Path | None, str | None]:
    """(local directory, problem) for a model reference.

    A local path is returned as is (the problem says when it does not exist). A hub id
    is looked up in the Hugging Face cache: its snapshot directory when cached; when it
    is not, offline that is a problem, online (None, None) leaves it to mergekit.
    """
    path, revision = split_ref(ref)
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = base_dir / candidate
    if candidate.exists():
        return candidate, None
    if not names_hub_model(ref, base_dir):
        return candidate, f"model path {str(candidate)!r} does not exist"
    snapshot = cached_snapshot(path, revision, cache_dir)
    if snapshot is not None:
        return snapshot, None
    if hub_offline():
        at = f" at revision {revision!r}" if revision else ""
        return None, (
            f"{path!r} is not a local directory (no {candidate}) and the hub model {path!r}{at} "
            "is not in the Hugging Face cache (HF_HUB_OFFLINE is set, so it cannot be downloaded)"
        )
    return None, None


def _check_models(raw: Mapping[str, Any], base_dir: Path, need_models: bool) -> list[RecipeProblem]:
    problems: list[RecipeProblem] = []
    vocab: dict[str, tuple[str, int]] = {}
    for key, ref in _model_refs(raw):
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


def _vocab_size(cfg: Mapping[str, Any]) -> int | None:
    for key in _VOCAB_KEYS:
        if isinstance(cfg.get(key), int):
            return cfg[key]
    text = cfg.get("text_config")
    if isinstance(text, Mapping) and isinstance(text.get("vocab_size"), int):
        return text["vocab_size"]
    return None
