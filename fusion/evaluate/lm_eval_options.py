"""How a model is scored with lm-evaluation-harness: `LmEvalOptions`, one definition for
``fusechat-merge eval``'s flags and a recipe's ``evaluate.lm_eval`` mapping, and
`LmEvalError`, the user error every lm-eval module raises (a message shown as is).

Loads with the standard library alone (no lm-eval, no torch), so the command line reads
`LmEvalOptions` at start-up for free.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fusion.errors import InputError, did_you_mean
from fusion.options import BACKENDS, TRUST_HELP, check_options, option


class LmEvalError(InputError):
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
    trust_remote_code: bool = option(False, TRUST_HELP)

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
                raise LmEvalError(f"{where}: unknown option {key!r}{did_you_mean(str(key), names)}")
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
            check_options(self)  # kinds, choices and ranges, as declared on the fields
        except ValueError as err:
            raise LmEvalError(str(err)) from err
        if self.include_path is not None and not isinstance(self.include_path, str | os.PathLike):
            raise LmEvalError(f"include_path must be a folder path, got {self.include_path!r}")
        parse_model_args(self.model_args)


def lm_eval_version() -> str | None:
    """The installed lm-eval's version (None: not installed); a stage key holds it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return None


OWN_OPTIONS = {"batch_size": "batch_size", "device": "device"}
"""lm-eval model arguments that `LmEvalOptions` sets itself (model_args key → option)."""


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
        if key.strip() in OWN_OPTIONS:  # lm-eval would get it twice and fail with a TypeError
            raise LmEvalError(f"model_args: {key.strip()} is an option of its own: give "
                              f"--{OWN_OPTIONS[key.strip()].replace('_', '-')} (a recipe: lm_eval."
                              f"{OWN_OPTIONS[key.strip()]}), not {key.strip()}= in model_args")
        out[key.strip()] = value.strip()
    return out


