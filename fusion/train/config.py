"""The fusion training configuration: `FusionConfig` (``TrainingArguments`` plus the fusion
settings), built from keyword arguments (`fusion_config`) or from the ``fuse`` command's
``--config`` file and flags (`parse_fusion_config`), and refused before any work when a
value cannot make a run."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from fusion.options import FusionSettings


@dataclass
class FusionConfig(TrainingArguments, FusionSettings):
    """TrainingArguments plus the fusion settings (`fusion.options.FusionSettings`)."""

    def __post_init__(self) -> None:
        check_training_values(self)
        super().__post_init__()
        self.check_fusion_settings()


def check_training_values(args: Any) -> None:
    """ValueError naming the first training value that cannot make a run (before any work)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    need(args.learning_rate > 0, f"learning_rate must be > 0, got {args.learning_rate}")
    need(args.max_steps == -1 or args.max_steps > 0,
         f"max_steps must be > 0 (or -1: train num_train_epochs), got {args.max_steps}")
    need(args.max_steps > 0 or args.num_train_epochs > 0,
         f"num_train_epochs must be > 0 when max_steps is not set, got {args.num_train_epochs}")
    need(args.per_device_train_batch_size >= 1,
         f"per_device_train_batch_size must be >= 1, got {args.per_device_train_batch_size}")
    need(args.gradient_accumulation_steps >= 1,
         f"gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}")
    need(args.weight_decay >= 0, f"weight_decay must be >= 0, got {args.weight_decay}")
    ratio = getattr(args, "warmup_ratio", None)
    need(ratio is None or 0 <= ratio <= 1, f"warmup_ratio must be in [0, 1], got {ratio}")
    need(args.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {args.max_grad_norm}")
    need(args.save_steps > 0, f"save_steps must be > 0, got {args.save_steps}")
    need(args.logging_steps > 0, f"logging_steps must be > 0, got {args.logging_steps}")


def fusion_config(output_dir: str | os.PathLike[str], **kwargs: Any) -> FusionConfig:
    """A `FusionConfig` whose checkpoints go under ``output_dir/checkpoints`` (numbers that
    YAML read as strings, ``5e-6``, become numbers)."""
    _refuse_own_keys(kwargs, "training options")
    settings = _fusion_defaults(_typed(kwargs))
    return FusionConfig(output_dir=str(Path(output_dir) / "checkpoints"), **settings)


def parse_fusion_config(
    output_dir: str | os.PathLike[str],
    from_file: Mapping[str, Any],
    argv: Sequence[str],
    flags: Mapping[str, Any],
) -> FusionConfig:
    """The ``fuse`` command's configuration: defaults, then a ``--config`` mapping, then
    TrainingArguments flags (``argv``, e.g. ``--max-steps 10``), then the fusion flags.
    Every value given reaches the Trainer, also one equal to the library's default.

    Everything goes through ``HfArgumentParser``: argv through its argument parser, the
    merged mapping through its dict path, so unknown keys are refused by name.
    """
    from transformers import HfArgumentParser

    for where, keys in (("--config", from_file), ("flags", _given(argv))):
        _refuse_own_keys(keys, where)
    parser = HfArgumentParser(FusionConfig)
    from_argv = _given_values(parser, argv)
    settings = {**_typed(from_file), **from_argv, **flags}
    _fusion_defaults(settings)
    (config,) = parser.parse_dict({"output_dir": str(Path(output_dir) / "checkpoints"), **settings})
    return config


def _given_values(parser: Any, argv: Sequence[str]) -> dict[str, Any]:
    """The TrainingArguments flags ``argv`` gives, typed, and only those: a flag equal to the
    library's default still overrides ``--config`` and this tool's defaults (comparing with
    the default cannot tell "given" from "left out")."""
    import argparse

    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
            action.required = False
    try:
        namespace, rest = parser.parse_known_args(list(argv))
    except SystemExit as err:  # argparse has printed which flag it rejects
        raise ValueError(f"bad training option in {' '.join(argv)!r}") from err
    if rest:
        raise ValueError(f"unknown training option(s) {' '.join(rest)!r}")
    return vars(namespace)


def _given(argv: Sequence[str]) -> list[str]:
    return [a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")]


OWN_KEYS = {"output_dir": "the target goes to --out, its checkpoints to OUT/checkpoints"}
"""TrainingArguments fields this tool sets itself: a value given for one is refused, never dropped."""


def _refuse_own_keys(keys: Any, where: str) -> None:
    for key in keys:
        if key in OWN_KEYS:
            raise ValueError(f"{key} ({where}) is set by this command: {OWN_KEYS[key]}")


def _typed(values: Mapping[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads ``5e-6`` as a string: give numeric fields numbers, as argparse would."""
    kinds = {f.name: type(f.default) for f in dataclasses.fields(FusionConfig) if f.init}
    out = dict(values)
    for key, value in values.items():
        kind = kinds.get(key)
        if isinstance(value, str) and kind in (int, float):
            try:
                out[key] = kind(value)
            except ValueError as err:
                raise ValueError(f"{key}: expected a number, got {value!r}") from err
    return out


def _fusion_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """This project's TrainingArguments defaults for fusion runs (a caller's value wins)."""
    settings.setdefault("report_to", "none")
    settings.setdefault("save_strategy", "epoch")
    settings.setdefault("logging_steps", 1)
    settings.setdefault("remove_unused_columns", False)
    settings.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    return settings
