"""Score a model on lm-evaluation-harness tasks: options, input checks, the run, its results.

The one entry point is `run_lm_eval(model, options)`, used by ``fusechat-merge eval`` and
meant for the pipeline's ``evaluate.lm_eval`` stage. It checks every input before any model
is loaded (the model folder or hub id, the include path, the task names, the backend), so a
typo costs seconds rather than a model load, then calls ``lm_eval.simple_evaluate`` and
returns lm-eval's own results dictionary unchanged apart from ``config.model_args``.

Every user error is an `LmEvalError` with a message meant to be shown as is. lm-eval itself
is imported only inside the functions that need it: this module loads with the standard
library alone, so the command line can read `LmEvalOptions` at start-up for free.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion.artifacts.atomic import write_text_atomic
from fusion.artifacts.provenance import InputError, has_chat_template
from fusion.model_refs import resolve_model
from fusion.options import BACKENDS, check_options, option

EXTRA_HINT = "pip install 'fusechat-merge[eval]'"
VLLM_HINT = "pip install 'fusechat-merge[vllm]'"
# Keys of lm-eval's per-task result entries that are not metrics.
_NOT_METRICS = frozenset({"alias", "name", "sample_len", "samples"})


class LmEvalError(ValueError):
    """A user error (bad option, missing path, unknown task, model that cannot load)."""


@dataclass(frozen=True)
class LmEvalOptions:
    """How to score a model with lm-eval: one definition for the CLI and the recipe.

    The command line derives ``fusechat-merge eval``'s options from these fields (name,
    type, default and ``help``); a pipeline recipe's ``evaluate.lm_eval`` mapping is read
    with `LmEvalOptions.from_mapping`.
    """

    tasks: tuple[str, ...] = option(
        (), "lm-eval task, group or tag names (comma-separated on the command line): any task "
        "lm-eval knows, or one defined under --include-path.", metavar="T1[,T2...]", required=True)
    include_path: str | None = option(
        None, "A folder of local lm-eval task YAML files (searched recursively).", metavar="DIR")
    num_fewshot: int | None = option(
        None, "Few-shot examples per prompt [default: each task's own, else 0].", min=0)
    apply_chat_template: bool = option(
        False, "Render prompts with the model's chat template (needed for chat models).")
    batch_size: int = option(1, "Requests per forward pass.", min=1)
    device: str = option("auto", "auto: CUDA when available, else CPU.", choices=("auto", "cpu", "cuda"))
    limit: int | None = option(None, "Score only the first N examples of each task (for tests).", min=1)
    backend: str = option("hf", "hf: transformers (any device). vllm: vLLM (needs the vllm extra, CUDA).",
                          choices=BACKENDS)
    bootstrap_iters: int = option(
        100000, "Resamples for lm-eval's bootstrapped standard errors (perplexity, bleu, ...; seconds "
        "per task); 0 skips all standard errors. Metrics do not depend on it.", min=0)
    model_args: str | None = option(
        None, "Extra lm-eval model arguments as k=v,k=v (e.g. dtype=float32,max_length=512).",
        metavar="K=V[,K=V...]")

    def __post_init__(self) -> None:
        tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
        tasks = tuple(t.strip() if isinstance(t, str) else t for t in tasks)
        object.__setattr__(self, "tasks", tuple(t for t in tasks if t != ""))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = "lm_eval") -> LmEvalOptions:
        """Options from a recipe mapping; unknown keys and wrong types raise LmEvalError."""
        if not isinstance(raw, Mapping):
            raise LmEvalError(f"{where}: expected a mapping, got {type(raw).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in raw:
            if key not in names:
                raise LmEvalError(f"{where}: unknown option {key!r}{_did_you_mean(str(key), names)}")
        values = dict(raw)
        if isinstance(values.get("tasks"), str):
            values["tasks"] = values["tasks"].split(",")
        options = cls(**values)
        options.check()
        return options

    def check(self) -> None:
        """Raise LmEvalError for values no run could use (paths and names are checked later)."""
        if not self.tasks:
            raise LmEvalError("no task given: name at least one lm-eval task")
        if not all(isinstance(t, str) for t in self.tasks):
            raise LmEvalError(f"tasks must be names, got {list(self.tasks)!r}")
        try:
            check_options(self)
        except ValueError as err:
            raise LmEvalError(str(err)) from err
        required_ints = ("batch_size", "bootstrap_iters")
        for name, low in (("batch_size", 1), ("num_fewshot", 0), ("limit", 1), ("bootstrap_iters", 0)):
            value = getattr(self, name)
            required = name in required_ints
            if (value is None and not required) or (
                isinstance(value, int) and not isinstance(value, bool) and value >= low
            ):
                continue
            raise LmEvalError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.apply_chat_template, bool):
            raise LmEvalError(f"apply_chat_template must be true or false, got {self.apply_chat_template!r}")
        for name, allowed in (("device", ("auto", "cpu", "cuda")), ("backend", ("hf", "vllm"))):
            if getattr(self, name) not in allowed:
                raise LmEvalError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.include_path is not None and not isinstance(self.include_path, str | os.PathLike):
            raise LmEvalError(f"include_path must be a folder path, got {self.include_path!r}")
        parse_model_args(self.model_args)

    def settings(self) -> dict[str, Any]:
        """What decides a score, as plain JSON values (for a stage's cache key).

        Adds the lm-eval version and a digest of the include path's files, so an edited
        local task or data file is scored again (data a YAML names outside that folder is
        not digested; the generated skill tasks keep theirs inside); ``device`` and
        ``batch_size`` are left out.
        """
        values = dataclasses.asdict(self)
        values.pop("device")
        values.pop("batch_size")
        values["tasks"] = list(self.tasks)
        values["include_path"] = None if self.include_path is None else str(self.include_path)
        values["lm_eval_version"] = _lm_eval_version()
        values["include_digest"] = (
            None if self.include_path is None else _folder_digest(Path(self.include_path))
        )
        return values


def _did_you_mean(name: str, candidates: Sequence[str], n: int = 5) -> str:
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
    return f" (close names: {', '.join(close)})" if close else ""


def _lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return None


def _folder_digest(folder: Path) -> str | None:
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def parse_model_args(text: str | None) -> dict[str, str]:
    """``k=v,k=v`` as a dict (values stay strings: lm-eval converts them itself)."""
    if not text:
        return {}
    if not isinstance(text, str):
        raise LmEvalError(f"model_args must be a k=v,k=v string, got {text!r}")
    out: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise LmEvalError(f"model_args: {part!r} is not key=value")
        if key.strip() == "pretrained":
            raise LmEvalError("model_args: give the model with --model, not pretrained=")
        out[key.strip()] = value.strip()
    return out


# --------------------------------------------------------------------------- input checks


def require_lm_eval() -> None:
    """Raise LmEvalError naming the extra when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise LmEvalError(f"lm-evaluation-harness is not installed: {EXTRA_HINT}") from err


def check_model(model: str) -> str:
    """What lm-eval loads for ``model`` (`fusion.model_refs.resolve_model`: a saved model
    folder, or a hub id, from the cache when it is there)."""
    try:
        return resolve_model(model)
    except InputError as err:
        raise LmEvalError(str(err)) from None


def check_include_path(include_path: str | os.PathLike | None) -> Path | None:
    if include_path is None:
        return None
    path = Path(include_path).expanduser()
    if not path.exists():
        raise LmEvalError(f"include path does not exist: {include_path}")
    if not path.is_dir():
        raise LmEvalError(f"include path must be a folder of task YAML files: {include_path}")
    if not any(path.rglob("*.yaml")):
        raise LmEvalError(f"include path {include_path} holds no .yaml task file")
    return path


def check_chat_template(model: str) -> None:
    """A local model asked to use its chat template must have one (hub ids are not checked)."""
    path = Path(model).expanduser()
    if not path.is_dir() or has_chat_template(path):
        return
    raise LmEvalError(f"--apply-chat-template: the tokenizer of {model} has no chat template")


def task_manager(include_path: Path | None, tasks: Sequence[str]) -> Any:
    """lm-eval's TaskManager that knows ``tasks``, resolving patterns; LmEvalError if one is unknown.

    With an include path, a manager of the local tasks alone is tried first: indexing
    lm-eval's own thousands of task files takes seconds, and local tasks do not need them.
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if not _unknown(local, tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = _unknown(manager, tasks)
    if unknown:
        where = "" if include_path is None else f" nor under {include_path}"
        lines = [f"{name!r}{_did_you_mean(name, manager.all_tasks)}" for name in unknown]
        raise LmEvalError(
            f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} (not one lm-eval knows{where}): "
            + "; ".join(lines)
        )
    return manager


def _unknown(manager: Any, tasks: Sequence[str]) -> list[str]:
    known = set(manager.all_tasks)
    return [
        t
        for t in tasks
        if t not in known
        and not (t.endswith(".yaml") and Path(t).is_file())
        and not (any(c in t for c in "*?[") and manager.match_tasks([t]))
    ]


def resolve_tasks(manager: Any, tasks: Sequence[str]) -> list[str]:
    """Names with glob patterns expanded (lm-eval's Python API takes exact names only)."""
    out: list[str] = []
    for t in tasks:
        matched = manager.match_tasks([t]) if any(c in t for c in "*?[") else [t]
        out += [m for m in matched if m not in out]
    return out


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def prepare(model: str, options: LmEvalOptions) -> tuple[Any, list[str]]:
    """Check everything a run needs before any model is loaded: ``(task manager, tasks)``."""
    options.check()
    check_model(str(model))
    include = check_include_path(options.include_path)
    if options.apply_chat_template:
        check_chat_template(str(model))
    require_lm_eval()
    if options.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise LmEvalError(f"--backend vllm needs vLLM: {VLLM_HINT}")
    manager = task_manager(include, options.tasks)
    return manager, resolve_tasks(manager, options.tasks)


# --------------------------------------------------------------------------- the run


def run_lm_eval(
    model: str | os.PathLike,
    options: LmEvalOptions,
    *,
    manager: Any = None,
    tasks: Sequence[str] | None = None,
) -> dict[str, Any]:
    """lm-eval's results dict for ``model`` (a model folder or hub id) on ``options.tasks``.

    ``manager`` and ``tasks`` may come from an earlier `prepare` (scoring several models
    on the same tasks then indexes the tasks once). Raises LmEvalError for user errors.
    """
    model = str(model)
    if manager is None or tasks is None:
        manager, tasks = prepare(model, options)
    elif options.apply_chat_template:
        check_chat_template(model)
    import lm_eval
    from lm_eval.api.registry import get_model

    model_args: dict[str, Any] = {"pretrained": check_model(model), **parse_model_args(options.model_args)}
    device = resolve_device(options.device)
    # vLLM places the model itself (CUDA_VISIBLE_DEVICES) and warns about a device argument.
    extra = {"batch_size": options.batch_size, "device": device if options.backend == "hf" else None}
    try:
        lm = get_model(options.backend).create_from_arg_obj(model_args, extra)
    except (OSError, ValueError, KeyError) as err:
        raise LmEvalError(f"cannot load model {model}: {_first_line(err)}") from err
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=options.num_fewshot,
            limit=options.limit,
            apply_chat_template=options.apply_chat_template,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=options.bootstrap_iters,
        )
    except FileNotFoundError as err:
        raise LmEvalError(f"lm-eval could not find a task's data: {_first_line(err)}") from err
    except ConnectionError as err:
        raise LmEvalError(
            f"lm-eval could not download a task's data (offline?): {_first_line(err)}"
        ) from err
    finally:
        del lm
        _free_memory(device)
    if results is None:  # only on non-zero ranks of a distributed run
        return {}
    results.setdefault("config", {})["model_args"] = model_args
    results["config"]["model"] = model
    return results


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _free_memory(device: str) -> None:
    """Release the dropped model's accelerator memory before the next model is loaded.

    On CPU reference counting frees it already (a full ``gc.collect`` costs ~0.5 s).
    """
    if device.startswith("cuda"):
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- results


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays, sets, dtypes and the like as JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def results_json(results: Mapping[str, Any]) -> str:
    """lm-eval's results as JSON text (per-sample logs are not part of it)."""
    kept = {k: v for k, v in results.items() if k != "samples"}
    return json.dumps(kept, indent=2, default=_json_default, ensure_ascii=False)


def write_results(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the results JSON atomically (a reader never sees half of it)."""
    return write_text_atomic(path, results_json(results) + "\n")


def format_table(results: Mapping[str, Any]) -> str:
    """lm-eval's own markdown table(s): tasks, then groups when there are any."""
    from lm_eval.utils import make_table

    table = make_table(dict(results))
    if results.get("groups"):
        table += "\n" + make_table(dict(results), "groups")
    return table


def metrics_by_task(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results, for reports.

    lm-eval keys a metric as ``"metric,filter"``; the filter is dropped when it is lm-eval's
    default ``none`` and kept otherwise (``"exact_match,strict-match"``). Standard errors
    and non-numeric entries are left out.
    """
    out: dict[str, dict[str, float]] = {}
    for task, entry in (results.get("results") or {}).items():
        metrics: dict[str, float] = {}
        for key, value in entry.items():
            if key in _NOT_METRICS or "_stderr" in key:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name in ("", "none") else key
            metrics[name] = float(value) if math.isfinite(float(value)) else float("nan")
        out[task] = metrics
    return out
