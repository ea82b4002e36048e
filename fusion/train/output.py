"""The finished target: the model and the pivot's tokenizer published through the target's
lifecycle (`publish_model`), with ``train_run.json``, what the training run recorded about itself
(`read_train_run`: processes, steps, global batch, the means of its two loss terms)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusion.artifacts.atomic import write_json_atomic

if TYPE_CHECKING:
    from transformers import Trainer

    from fusion.artifacts.lifecycle import Writing

TRAIN_RUN = "train_run.json"
LOGGED_PARTS = {"clm": "clm_loss", "fuse": "fuse_loss", "fuse_grad_share": "fuse_grad_share",
                "grad_cosine": "grad_cosine"}


def read_train_run(out: str | os.PathLike[str]) -> dict[str, Any]:
    """What the training run that made the target ``out`` recorded about itself: the number
    of training processes (``world_size``), the distributed type, steps and global batch
    (empty for a target made before this file existed)."""
    path = Path(out) / TRAIN_RUN
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def trained_to_the_end(out: Path) -> bool:
    """Whether ``out`` holds a published target trained to its last step (a training stopped
    early by a callback publishes too: it resumes)."""
    if not (out / "config.json").is_file():
        return False
    run = read_train_run(out)
    return run.get("global_step", 0) >= run.get("max_steps", 0)


def loss_parts(log_history: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """The means of what a training run logged of its two terms (None: not logged, as in
    plain CLM training): ``clm`` and ``fuse`` losses, the fusion term's share of the
    gradient at the logits and the cosine of the two gradients (`fusion.train.losses.gradient_parts`)."""
    out: dict[str, float | None] = {}
    for part, logged in LOGGED_PARTS.items():
        values = [float(e[logged]) for e in log_history if logged in e]
        out[part] = sum(values) / len(values) if values else None
    return out


def publish_model(trainer: Trainer, tokenizer, made: Writing) -> None:
    """Save the model and the pivot's tokenizer, then publish them into the target (config.json
    last) through its lifecycle (`fusion.artifacts.lifecycle.Writing`): saved into the marked
    staging directory ``.NAME.partial-final`` beside it (the same name in every process: under
    FSDP and DeepSpeed ZeRO-3 ``save_model`` gathers the sharded weights, a collective, so
    every process calls this; only the main process writes and publishes)."""
    main = trainer.is_world_process_zero()
    staging = made.staging("final") if main else made.out.with_name(f".{made.out.name}.partial-final")
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if not main:
        return
    tokenizer.save_pretrained(str(staging))
    write_json_atomic(staging / TRAIN_RUN, {
        "world_size": trainer.args.world_size, "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "global_step": trainer.state.global_step, "max_steps": trainer.state.max_steps,
        "global_batch": trainer.args.world_size * trainer.args.per_device_train_batch_size
        * trainer.args.gradient_accumulation_steps,
        "lm_weight": trainer.args.lm_weight, "loss_parts": loss_parts(trainer.state.log_history)})
    made.publish_files(staging, last=("config.json",))
