"""Score a model on lm-evaluation-harness tasks: the input checks, then the run.

The one entry point is `run_lm_eval(model, options)`, used by ``fusechat-merge eval`` and
the pipeline's ``evaluate.lm_eval`` stage. It checks every input before any model is loaded
(the model folder or hub id, the include path, the task names, the backend), so a typo costs
seconds rather than a model load, then calls ``lm_eval.simple_evaluate`` and returns
lm-eval's own results dictionary unchanged apart from ``config.model_args``
(`fusion.evaluate.lm_eval_results` reads and writes it). lm-eval itself is imported only inside the
functions that need it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusion.data.chat_templates import has_chat_template
from fusion.data.content_cache import content_keyed_loads
from fusion.errors import InputError, did_you_mean
from fusion.evaluate.lm_eval_options import LmEvalError, LmEvalOptions, parse_model_args
from fusion.names import resolve_model
from fusion.runtime.memory_faults import OutOfMemory, memory_faults_named, ran_out
from fusion.runtime.remote_code import RemoteCodeError, check_remote_code

EXTRA_HINT = "pip install 'fusechat-merge[eval]'"
VLLM_HINT = "pip install 'fusechat-merge[vllm]'"


def require_lm_eval() -> None:
    """Raise LmEvalError naming the extra when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise LmEvalError(f"lm-evaluation-harness is not installed: {EXTRA_HINT}") from err


def check_model(model: str, trust_remote_code: bool = False) -> str:
    """What lm-eval loads for ``model`` (`fusion.names.resolve_model`: a saved model
    folder, or a hub id, from the cache when it is there); one that ships its own code
    only with ``trust_remote_code``."""
    try:
        resolved = resolve_model(model)
        check_remote_code(resolved, trust_remote_code)
    except (InputError, RemoteCodeError) as err:
        raise LmEvalError(str(err)) from None
    return resolved


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
        lines = [f"{name!r}{did_you_mean(name, manager.all_tasks)}" for name in unknown]
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
    check_model(str(model), options.trust_remote_code)
    include = check_include_path(options.include_path)
    if options.apply_chat_template:
        check_chat_template(str(model))
    require_lm_eval()
    if options.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise LmEvalError(f"--backend vllm needs vLLM: {VLLM_HINT}")
    manager = task_manager(include, options.tasks)
    return manager, resolve_tasks(manager, options.tasks)


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

    model_args: dict[str, Any] = {"pretrained": check_model(model, options.trust_remote_code),
                                  **parse_model_args(options.model_args)}
    if options.trust_remote_code:  # lm-eval hands it to transformers (config, tokenizer, model) and vLLM
        model_args["trust_remote_code"] = True
    device = resolve_device(options.device)
    # vLLM places the model itself (CUDA_VISIBLE_DEVICES) and warns about a device argument.
    extra = {"batch_size": options.batch_size, "device": device if options.backend == "hf" else None}
    less = (f"lower batch_size (now {options.batch_size}), or a shorter max_length in model_args "
            "(max_length=...)" + (", or dtype=bfloat16 in model_args" if "dtype" not in model_args else ""))
    try:
        with memory_faults_named(f"scoring {model} with lm-eval", lambda: "no result was written", lambda: less):
            return _evaluate(lm_eval, get_model, model, model_args, extra, device, options, manager, tasks)
    except OutOfMemory as err:
        raise LmEvalError(str(err)) from err


def _evaluate(lm_eval: Any, get_model: Any, model: str, model_args: dict[str, Any], extra: dict[str, Any],
              device: str, options: LmEvalOptions, manager: Any, tasks: Sequence[str]) -> dict[str, Any]:
    try:
        lm = get_model(options.backend).create_from_arg_obj(model_args, extra)
    except (OSError, ValueError, KeyError) as err:
        if ran_out(err):
            raise
        raise LmEvalError(f"cannot load model {model}: {_first_line(err)}") from err
    try:
        with content_keyed_loads():  # a task's local data read as it is now, not as cached
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


