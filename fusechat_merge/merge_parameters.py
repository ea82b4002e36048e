"""A merge method's parameters in a recipe: the ones it does not have, shared ones given
per model, values it refuses, and required ones without a value (mergekit ignores the
first two silently and finds the last mid-merge). Key paths are the recipe's
(`fusechat_merge.merge_recipe` walks it); messages are worded once for both recipe forms,
a mergekit recipe and a pipeline recipe's merge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fusion.errors import did_you_mean


def find_method(name: str) -> tuple[Any, str | None]:
    """``(method, None)`` for a merge method mergekit knows (``fusechat_sce`` included), else
    ``(None, message)`` naming the close names."""
    from mergekit.merge_methods import registry

    from fusechat_merge.mergekit_adapter import register

    register()
    try:
        return registry.get(name), None
    except RuntimeError:
        names = [m.spec.name for m in registry.registered_methods()]
        return None, f"mergekit knows no merge method {name!r}{did_you_mean(name, names)}"


def parameter_problems(blocks: Iterable[tuple[str, Any, bool]], method) -> list[tuple[str, str]]:
    """(key, message) for every parameter of ``blocks`` (key, ``parameters:`` mapping,
    per_model) that ``method`` does not have, that is shared but given per model, or whose
    value it refuses."""
    from mergekit.merge_methods.base import ParameterScope

    specs = {p.name: p for p in method.spec.parameters}
    name = method.spec.name
    problems: list[tuple[str, str]] = []
    for key, params, per_model in blocks:
        if params is None:
            continue
        if not isinstance(params, Mapping):
            problems.append((key, "must be a mapping of parameter names to values"))
            continue
        for pname, setting in params.items():
            pkey = f"{key}.{pname}"
            spec = specs.get(pname)
            if spec is None:
                known = ", ".join(sorted(specs)) or "none"
                hint = did_you_mean(str(pname), specs)
                problems.append((pkey, f"{name} has no parameter {pname!r}{hint}: mergekit would silently "
                                       f"ignore it (known: {known})"))
                continue
            if per_model and spec.scope == ParameterScope.SHARED:
                problems.append((pkey, f"{pname!r} is a shared parameter of {name}: mergekit ignores it "
                                       "per model. Move it to the top-level `parameters:`"))
                continue
            for value in _setting_values(setting):
                try:
                    spec.validate(value)
                except Exception as err:  # pydantic ValidationError or our ValueError
                    problems.append((pkey, _first_line_error(err)))
                    break
    return problems


# How each recipe form names what needs a missing parameter, and how to give it ({p}).
MERGEKIT_FORM = {
    "base": ("the base model too, which it merges as an input",
             "list it under models with parameters.{p}, or give a top-level parameters.{p}"),
    "each": ("each model", "or a top-level parameters.{p}"),
}
PIPELINE_FORM = {
    "base": ("the pivot too, which `base: true` merges as an input", "set base: false or give parameters.{p}"),
    "each": ("each target", "model_parameters.{p} or parameters.{p}"),
}


def missing_message(method: str, parameter: str, need: str, form: Mapping[str, tuple[str, str]]) -> str:
    """The message of a required parameter without a value; ``need`` is what lacks it:
    ``shared`` (the merge), ``base`` or ``each`` (model), named as ``form`` names them."""
    if need == "shared":
        return f"{method} needs the parameter {parameter!r}"
    who, fix = form[need]
    return f"{method} needs {parameter!r} for {who} ({fix.format(p=parameter)})"


def need_of(key: str, *, pivot_first: bool = False) -> str:
    """What a `missing_required` key stands for (``pivot_first``: the pipeline lists its
    pivot as models[0] when it merges it as the base)."""
    if key == "parameters":
        return "shared"
    return "base" if key == "base_model" or (pivot_first and key == "models[0].parameters") else "each"


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
