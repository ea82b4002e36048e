"""Which training checkpoints may be resumed: the training's run record (`training_record`,
kept as ``OUT/run.json`` by `fusion.artifacts.lifecycle` like every output's) and the
``checkpoint_complete.json`` marker of each checkpoint the Trainer finished saving
(`training_output` declares the target as an output made in pieces: its checkpoints)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from fusion.artifacts.atomic import write_json_atomic
from fusion.artifacts.lifecycle import RUN_FILE, Output
from fusion.artifacts.provenance import model_fingerprint, store_fingerprint
from fusion.options import FusionSettings
from fusion.runtime import stopping
from fusion.train.output import trained_to_the_end

if TYPE_CHECKING:
    from fusion.train.config import FusionConfig

LEGACY_RUN_FILE = "fusion_run.json"
"""Where versions before the one output lifecycle kept the record: OUT/checkpoints/ (adopted)."""
COMPLETE_FILE = "checkpoint_complete.json"
"""Written into a checkpoint once the Trainer has saved all of it: only those are resumed."""
# The TrainingArguments that change the trained weights (with the fusion settings and the
# inputs' fingerprints they make a run's identity; logging, saving and tqdm do not).
RESULT_KEYS = (
    "learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size",
    "gradient_accumulation_steps", "seed", "data_seed", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_epsilon", "max_grad_norm", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio",
    "warmup_steps", "optim", "optim_args", "bf16", "fp16", "label_smoothing_factor",
)


def training_record(pivot: str, aligned: Sequence[str], config: FusionConfig) -> dict[str, Any]:
    """What makes a training run what it is: the options that change the weights, the
    pivot's and the aligned stores' fingerprints."""
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(FusionSettings)}
    values = {key: getattr(config, key, None) for key in RESULT_KEYS}
    values = {k: v if isinstance(v, int | float | str | bool | type(None)) else str(v) for k, v in values.items()}
    return {**values, **settings, "pivot": str(pivot), "pivot_model": model_fingerprint(pivot),
            "aligned": [str(a) for a in aligned], "aligned_stores": [store_fingerprint(a) for a in aligned]}


LOCATION_KEYS = ("pivot", "aligned")
"""Where the pivot and the stores lay: kept for the reader, never compared (their
fingerprints are), so checkpoints moved with their work dir still resume."""
TRAINING_INPUTS = {"pivot_model": "the pivot model changed since this training was started",
                   "aligned_stores": "the aligned stores changed since this training was started"}
FINAL_FILE = "config.json"
"""Published last: a target folder with it is a finished target."""


def training_output(out: str | os.PathLike[str], record: dict[str, Any], checkpoints: Path,
                    reads: dict[str, str]) -> Output:
    """The target of a training as an output of `fusion.artifacts.lifecycle`: made in pieces
    (the complete checkpoints under ``checkpoints``, resumed), finished when its model is
    published (config.json last); a killed save's unfinished checkpoint is removed."""
    def pieces(target: Path) -> bool:
        return (target / FINAL_FILE).is_file() or bool(complete_checkpoints(checkpoints))

    def unfinished(_: Path) -> list[Path]:
        done = set(complete_checkpoints(checkpoints))
        return [p for p in checkpoints.glob("checkpoint-*") if p.is_dir() and p not in done]

    def kept(_: Path) -> str:
        done = complete_checkpoints(checkpoints)
        return (f"the checkpoints up to {done[-1].name} are kept: the same command resumes from there" if done
                else "no checkpoint was complete")

    return Output(out, "the target model", record, reads=reads, inputs=TRAINING_INPUTS, located=LOCATION_KEYS,
                  pieces=pieces, finished=trained_to_the_end, leftovers=unfinished,
                  kept=kept)


def adopt_legacy_record(out: Path, checkpoints: Path) -> None:
    """A training started by an earlier version kept its record in the checkpoints folder:
    moved to where every output keeps it, so it resumes."""
    legacy = checkpoints / LEGACY_RUN_FILE
    if legacy.is_file() and not (out / RUN_FILE).exists():
        legacy.replace(out / RUN_FILE)


def complete_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints the Trainer finished saving, by step."""
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and (p / COMPLETE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))


class StopAtStep(TrainerCallback):
    """On a stop request (`fusion.runtime.stopping`: SIGTERM, Ctrl-C) the Trainer saves a checkpoint
    at the step it just finished (model, optimizer, scheduler, RNG, data position: what
    ``resume_from_checkpoint`` needs) and ends the training; ``stopped`` then holds the
    signal and the step. Every process of a launch decides alike: the request of any
    process reaches all (a maximum over the processes after each step)."""

    def __init__(self) -> None:
        self.stopped: tuple[int, int] | None = None  # (signal, step)

    def on_step_end(self, args, state, control, **kw):
        signum = stopping.requested() or 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([signum], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        if signum:
            control.should_save = True
            control.should_training_stop = True
            self.stopped = (signum, state.global_step)
        return control


class MarkComplete(TrainerCallback):
    """Marks each checkpoint once it is saved whole (the Trainer calls on_save after)."""

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_json_atomic(folder / COMPLETE_FILE, {"global_step": state.global_step})
