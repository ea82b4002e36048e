"""Pairwise (or N-source) fusion training with the Hugging Face Trainer.

`FusionTrainer` overrides only ``compute_loss`` (`fusion.train.losses`); `train_fusion` runs it
on aligned stores. Everything else (bf16, gradient checkpointing, schedules,
``resume_from_checkpoint``, DDP/FSDP/DeepSpeed through accelerate) is the stock Trainer's.
The parts around it: `fusion.train.config` (`FusionConfig`: ``TrainingArguments`` plus the
fusion settings), `fusion.train.data` (dataset and collator), `fusion.train.checkpoints`
(which checkpoints may be resumed) and `fusion.train.output` (the published target).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import nested_gather

from fusion.artifacts.lifecycle import DONE, Writing, refuse_overlap, writing
from fusion.artifacts.logit_store import tokenizer_fingerprint
from fusion.artifacts.records import StoreError
from fusion.data.batching import pad_token_id
from fusion.names import resolve_model
from fusion.runtime import stopping
from fusion.runtime.log_capture import echo
from fusion.runtime.memory_faults import memory_faults_named
from fusion.runtime.remote_code import RemoteCodeError, check_remote_code
from fusion.train.checkpoints import (
    MarkComplete,
    StopAtStep,
    adopt_legacy_record,
    complete_checkpoints,
    training_output,
    training_record,
)
from fusion.train.config import FusionConfig
from fusion.train.data import TEACHER_KEYS, FusionCollator, FusionDataset
from fusion.train.losses import fuse, fusion_objective
from fusion.train.output import publish_model
from fusion.train.progress import TrainProgress


def logs_after_step(global_step: int, logging_steps: float | None, strategy: Any) -> bool:
    """Whether the Trainer logs when the optimizer step after ``global_step`` completed
    steps ends (it logs at ``global_step % logging_steps == 0`` once the step is counted).
    The gradient measurement adds about half the loss's own cost, so it is paid only on the
    steps it reports; every step when logging is not by steps."""
    from transformers.trainer_utils import IntervalStrategy

    if strategy != IntervalStrategy.STEPS or not logging_steps:
        return True
    return (global_step + 1) % int(logging_steps) == 0


class FusionTrainer(Trainer):
    """`Trainer` whose loss is ``λ·CLM + (1−λ)·fusion`` (plain CLM when λ = 1)."""

    args: FusionConfig
    # compute_loss returns a mean over the micro-batch's trained tokens, not a sum divided by
    # `num_items_in_batch`: the Trainer must divide it by the accumulation steps itself (its
    # default guesses "already scaled" because the model's forward takes loss kwargs).
    loss_is_scaled_for_ga = False

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._parts: dict[str, list[float]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher = {key: inputs.pop(key) for key in TEACHER_KEYS}
        labels = inputs.pop("labels")
        if self.args.lm_weight == 1.0:  # plain causal-LM fine-tuning: the baseline
            outputs = model(**inputs, labels=labels)
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        outputs = model(**inputs)
        target_ids, target_probs = fuse(
            teacher["teacher_ids"],
            teacher["teacher_logprobs"],
            teacher["teacher_valid"],
            teacher["teacher_ce"],
            teacher["teacher_gold"],
            method=self.args.fusion,
            temperature=self.args.fuse_temperature,
        )
        loss, parts = fusion_objective(
            outputs.logits,
            labels,
            target_ids,
            target_probs,
            lm_weight=self.args.lm_weight,
            loss_type=self.args.fuse_loss_type,
            measure_gradients=self._logs_after_this_step(),  # fuse_grad_share, grad_cosine
        )
        for key, value in parts.items():
            self._parts.setdefault(key, []).append(float(value))
        return (loss, outputs) if return_outputs else loss

    def _logs_after_this_step(self) -> bool:
        return logs_after_step(self.state.global_step, self.state.logging_steps, self.args.logging_strategy)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # every process calls log() at the same step, like the Trainer's own loss gather
        for key, values in self._parts.items():
            if values and "loss" in logs:
                mean = torch.tensor(sum(values) / len(values), device=self.args.device)
                logs[key] = nested_gather(mean, self.args.parallel_mode).mean().item()
                values.clear()
        super().log(logs, *args, **kwargs)


def check_pivot(model_path: str, dataset: FusionDataset, trust_remote_code: bool = False):
    """The pivot's tokenizer, refusing stores made for another one (before training), and a
    pivot with its own code unless ``trust_remote_code``."""
    from transformers import AutoTokenizer

    try:
        check_remote_code(model_path, trust_remote_code, how_to_allow="--trust-remote-code (fuse)")
    except RemoteCodeError as err:
        raise StoreError(str(err)) from None
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint != dataset.pivot_fingerprint:
        raise StoreError(
            f"the aligned stores were made for another pivot tokenizer (fingerprint "
            f"{dataset.pivot_fingerprint}, {dataset.stores[0].options.model}) than {model_path} "
            f"({fingerprint}); align against this pivot's logit store"
        )
    return tokenizer


def train_fusion(
    pivot: str,
    aligned: Sequence[str],
    out: str | os.PathLike[str],
    config: FusionConfig,
    *,
    resume: bool | str | None = None,
    overwrite: bool = False,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Fine-tune ``pivot`` on the aligned stores; the finished model lands in ``out``
    (make ``config`` with `fusion.train.config.fusion_config`, which puts checkpoints in
    ``out/checkpoints``). The target goes through the one output lifecycle
    (`fusion.artifacts.lifecycle.writing`, `fusion.train.checkpoints.training_output`): a
    training of the same configuration (`training_record`) continues from its last
    complete checkpoint, a finished one is left as it is, another configuration is refused
    naming what changed unless ``overwrite`` starts over. ``resume`` is accepted for old
    callers (resuming is the default); a path resumes from that checkpoint. ``out`` may not
    be, lie in, or hold the pivot or a store; one training at a time writes it."""
    pivot = resolve_model(pivot, "pivot model")  # a cached hub id: its snapshot
    reads = {"pivot model": pivot, **{f"aligned store {a}": a for a in aligned}}
    refuse_overlap(out, reads)  # before the stores are read (again in `writing`)
    dataset = FusionDataset(aligned)
    tokenizer = check_pivot(pivot, dataset, config.trust_remote_code)
    out = Path(out)
    folder = Path(config.output_dir)
    main = int(os.environ.get("RANK", "0")) == 0  # all processes of a launch share `out`: one writes
    if main and out.is_dir():
        adopt_legacy_record(out, folder)
    output = training_output(out, training_record(pivot, aligned, config), folder, reads)

    def less() -> str:
        return (f"lower per_device_train_batch_size (now {config.per_device_train_batch_size}; raise "
                f"gradient_accumulation_steps, now {config.gradient_accumulation_steps}, to keep the batch), "
                "turn on gradient_checkpointing" + ("" if config.gradient_checkpointing else " (now off)")
                + ", score shorter sequences (the logits stage's max_length), or offload to the CPU "
                "(an accelerate config with DeepSpeed ZeRO offload or FSDP cpu_offload)")

    with memory_faults_named(f"training {out}", output.kept_now, less), \
            writing(output, overwrite=overwrite, main=main) as made:
        if made.state == DONE:
            echo(f"{out} already holds the target trained with these inputs and options: left as it is "
                 "(--overwrite trains it again)")
            return out
        done = complete_checkpoints(folder) if folder.is_dir() and not overwrite else []
        checkpoint = resume if isinstance(resume, str) else str(done[-1]) if done else None
        return _train(pivot, config, dataset, tokenizer, checkpoint, callbacks, made)


def _train(pivot: str, config: FusionConfig, dataset: FusionDataset, tokenizer: Any, checkpoint: str | None,
           callbacks: Sequence[Any], made: Writing) -> Path:
    from transformers import AutoModelForCausalLM

    # float32 master weights: --bf16 is autocast mixed precision, not bf16 weights (updates
    # of lr 5e-6 would round away in bf16)
    model = AutoModelForCausalLM.from_pretrained(pivot, dtype=torch.float32,
                                                 trust_remote_code=config.trust_remote_code)
    trainer = FusionTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        data_collator=FusionCollator(pad_id=pad_token_id(tokenizer)),
        processing_class=tokenizer,
        callbacks=[*callbacks, stop := StopAtStep(), MarkComplete(), TrainProgress()],
    )
    with stopping.watching():
        trainer.train(resume_from_checkpoint=checkpoint)
    if stop.stopped is not None:  # saved at the step reached: the resume continues from it
        signum, step = stop.stopped
        raise stopping.Stopped(signum, f"training saved checkpoint-{step} (step {step} of "
                                       f"{trainer.state.max_steps}) in {config.output_dir}")
    publish_model(trainer, tokenizer, made)  # on every process: FSDP/ZeRO-3 gather collectively
    return made.out
