"""Which training checkpoints may be resumed: the run record ``fusion_run.json`` (what
made the checkpoints in ``OUT/checkpoints``) and the ``checkpoint_complete.json`` marker
of each checkpoint the Trainer finished saving."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from fusion.artifacts.atomic import write_json_atomic
from fusion.artifacts.provenance import model_fingerprint, store_fingerprint
from fusion.artifacts.records import StoreError, differences, read_record, write_record
from fusion.options import FusionSettings
from fusion.runtime import stopping

if TYPE_CHECKING:
    from fusion.train.config import FusionConfig

RUN_FILE = "fusion_run.json"
"""The training configuration of the checkpoints in OUT/checkpoints (`--resume` must match it)."""
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


def resume_point(folder: Path, record: Mapping[str, Any], resume: bool, main_process: bool) -> str | None:
    """The checkpoint to resume from (None: start fresh). The main process checks and
    prepares ``folder`` (`prepare_checkpoints`); the others take its last complete checkpoint."""
    if main_process:
        return prepare_checkpoints(folder, record, resume)
    done = complete_checkpoints(folder) if resume else []
    return str(done[-1]) if done else None


def prepare_checkpoints(folder: Path, record: Mapping[str, Any], resume: bool) -> str | None:
    """The checkpoint to resume from (None: start fresh), after checking that the
    checkpoints in ``folder`` belong to this configuration; writes the run record."""
    done = complete_checkpoints(folder)
    started = [p for p in folder.glob("checkpoint-*") if p.is_dir()] if folder.is_dir() else []
    run_file = folder / RUN_FILE
    if started and not resume:
        raise StoreError(f"{folder} holds checkpoints of an earlier run",
                         "pass --resume to continue it, or choose another --out")
    if started:
        if not run_file.is_file():
            raise StoreError(f"{folder} holds checkpoints but no {RUN_FILE}: cannot tell which "
                             "configuration made them", "choose another --out")
        diffs = differences(read_record(run_file), record, ignore=LOCATION_KEYS)
        if diffs:
            raise StoreError(f"--resume: the checkpoints in {folder} come from another configuration "
                             f"({'; '.join(diffs)})", "choose another --out to train this one")
        for partial in set(started) - set(done):  # a killed save: never resumed, removed
            shutil.rmtree(partial, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    write_record(run_file, record)
    return str(done[-1]) if done else None
