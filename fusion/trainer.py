"""Pairwise (or N-source) fusion training with the Hugging Face Trainer.

`FusionConfig` is `TrainingArguments` plus four fields; `FusionDataset` reads aligned
stores (one per source, same pivot); `FusionCollator` pads them; `FusionTrainer`
overrides only ``compute_loss`` (`fusion.losses`). Everything else (bf16, gradient
checkpointing, schedules, ``resume_from_checkpoint``, DDP/FSDP/DeepSpeed through
accelerate) is the stock Trainer's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import nested_gather

from fusion.artifacts.aligned_store import AlignedStore
from fusion.artifacts.atomic import write_json_atomic
from fusion.artifacts.logit_store import StoreError, tokenizer_fingerprint
from fusion.artifacts.provenance import (
    check_outputs,
    model_fingerprint,
    require_model_dir,
    store_fingerprint,
)
from fusion.batching import pad_sequences
from fusion.losses import fuse, fusion_objective
from fusion.options import FusionSettings
from fusion.train_progress import TrainProgress

TEACHER_KEYS = ("teacher_ids", "teacher_logprobs", "teacher_valid", "teacher_ce", "teacher_gold")
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


class FusionDataset(torch.utils.data.Dataset):
    """One item per pivot sequence: its tokens and every teacher's distributions.

    All aligned stores must come from the same pivot store (same ids, same tokens).
    """

    def __init__(self, aligned: Sequence[str | os.PathLike[str]]) -> None:
        if not aligned:
            raise ValueError("fusion training needs at least one aligned store (--aligned)")
        self.stores = [AlignedStore(p) for p in aligned]
        first = self.stores[0]
        for store in self.stores[1:]:
            if store.options.tokenizer_fingerprint != first.options.tokenizer_fingerprint:
                raise StoreError(f"{store.path} and {first.path} were aligned to different pivots")
            if store.ids() != first.ids():
                raise StoreError(f"{store.path} and {first.path} hold different sequences")
        self.top_k = first.options.top_k

    @property
    def pivot_fingerprint(self) -> str:
        return self.stores[0].options.tokenizer_fingerprint

    def __len__(self) -> int:
        return len(self.stores[0])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rows = [store.aligned(index) for store in self.stores]
        pivot = rows[0].pivot
        p = len(pivot.target_logprobs)
        ids = [pivot.topk_ids] + [r.src_topk_ids for r in rows]
        lps = [pivot.topk_logprobs] + [r.src_topk_logprobs for r in rows]
        valid = [np.ones(p, dtype=bool)] + [r.src_aligned for r in rows]
        gold = [pivot.target_logprobs] + [r.src_target_logprobs for r in rows]
        return {
            "input_ids": pivot.input_ids.astype(np.int64),
            "loss_mask": pivot.loss_mask,
            "positions": pivot.positions,
            "teacher_ids": np.stack(ids).astype(np.int64),  # (S, P, K)
            "teacher_logprobs": np.stack(lps).astype(np.float32),
            "teacher_valid": np.stack(valid),
            "teacher_ce": np.array([pivot.seq_ce] + [r.src_seq_ce for r in rows], dtype=np.float32),
            "teacher_gold": np.stack(gold).astype(np.float32),
        }


@dataclass
class FusionCollator:
    """Pads a list of `FusionDataset` items into tensors.

    Example: two sequences of 5 and 3 tokens, S teachers, K entries →
    ``input_ids`` (2, 5) padded with ``pad_id``, ``attention_mask`` (2, 5), ``labels``
    (2, 5) with -100 on untrained tokens and padding, ``teacher_ids`` (2, S, 5, K) with the
    distribution of position t at index t (zeros elsewhere), ``teacher_logprobs`` likewise
    (-inf elsewhere), ``teacher_valid`` (2, S, 5), ``teacher_gold`` (2, S, 5) and
    ``teacher_ce`` (2, S).
    """

    pad_id: int = 0

    def __call__(self, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        b = len(items)
        t = max(len(it["input_ids"]) for it in items)
        s, _, k = items[0]["teacher_ids"].shape
        input_ids, attention = pad_sequences([it["input_ids"] for it in items], self.pad_id)
        labels = [np.where(np.asarray(it["loss_mask"], dtype=bool), it["input_ids"], -100) for it in items]
        out = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": pad_sequences(labels, -100)[0],
            "teacher_ids": torch.zeros(b, s, t, k, dtype=torch.long),
            "teacher_logprobs": torch.full((b, s, t, k), -float("inf")),
            "teacher_valid": torch.zeros(b, s, t, dtype=torch.bool),
            "teacher_gold": torch.full((b, s, t), float("nan")),
            "teacher_ce": torch.zeros(b, s),
        }
        for i, it in enumerate(items):
            pos = torch.from_numpy(it["positions"])
            out["teacher_ids"][i][:, pos] = torch.from_numpy(it["teacher_ids"])
            out["teacher_logprobs"][i][:, pos] = torch.from_numpy(it["teacher_logprobs"])
            out["teacher_valid"][i][:, pos] = torch.from_numpy(it["teacher_valid"])
            out["teacher_gold"][i][:, pos] = torch.from_numpy(it["teacher_gold"])
            out["teacher_ce"][i] = torch.from_numpy(it["teacher_ce"])
        return out


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


def check_pivot(model_path: str, dataset: FusionDataset):
    """The pivot's tokenizer, refusing stores made for another one (before training)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint != dataset.pivot_fingerprint:
        raise StoreError(
            f"the aligned stores were made for another pivot tokenizer (fingerprint "
            f"{dataset.pivot_fingerprint}, {dataset.stores[0].options.model}) than {model_path} "
            f"({fingerprint}); align against this pivot's logit store"
        )
    return tokenizer


def training_record(pivot: str, aligned: Sequence[str], config: FusionConfig) -> dict[str, Any]:
    """What makes a training run what it is: the options that change the weights, the
    pivot's and the aligned stores' fingerprints."""
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(FusionSettings)}
    values = {key: getattr(config, key, None) for key in RESULT_KEYS}
    values = {k: v if isinstance(v, int | float | str | bool | type(None)) else str(v) for k, v in values.items()}
    return {**values, **settings, "pivot": str(pivot), "pivot_model": model_fingerprint(pivot),
            "aligned": [str(a) for a in aligned], "aligned_stores": [store_fingerprint(a) for a in aligned]}


def complete_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints the Trainer finished saving, by step."""
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and (p / COMPLETE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))


class MarkComplete(TrainerCallback):
    """Marks each checkpoint once it is saved whole (the Trainer calls on_save after)."""

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_json_atomic(folder / COMPLETE_FILE, {"global_step": state.global_step})


def prepare_checkpoints(folder: Path, record: Mapping[str, Any], resume: bool) -> str | None:
    """The checkpoint to resume from (None: start fresh), after checking that the
    checkpoints in ``folder`` belong to this configuration; writes the run record."""
    done = complete_checkpoints(folder)
    started = [p for p in folder.glob("checkpoint-*") if p.is_dir()] if folder.is_dir() else []
    run_file = folder / RUN_FILE
    if started and not resume:
        raise StoreError(f"{folder} holds checkpoints of an earlier run; pass --resume to continue it, "
                         "or choose another --out")
    if started:
        if not run_file.is_file():
            raise StoreError(f"{folder} holds checkpoints but no {RUN_FILE}: cannot tell which "
                             "configuration made them; choose another --out")
        try:
            then = json.loads(run_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise StoreError(f"{run_file}: broken run record ({err})") from None
        diffs = [f"{k}: {then.get(k)!r} then, {v!r} now" for k, v in record.items() if then.get(k) != v]
        if diffs:
            raise StoreError(f"--resume: the checkpoints in {folder} come from another configuration "
                             f"({'; '.join(diffs)}); choose another --out to train this one")
        for partial in set(started) - set(done):  # a killed save: never resumed, removed
            shutil.rmtree(partial, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_file, dict(record))
    return str(done[-1]) if done else None


def train_fusion(
    pivot: str,
    aligned: Sequence[str],
    out: str | os.PathLike[str],
    config: FusionConfig,
    *,
    resume: bool | str | None = None,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Fine-tune ``pivot`` on the aligned stores; the finished model lands in ``out``
    (make ``config`` with `fusion_config`, which puts checkpoints in ``out/checkpoints``).
    ``resume=True`` continues from the last complete checkpoint there, only if it was made
    with the same configuration (`training_record`); a checkpoint already at ``max_steps``
    is published as it is. ``out`` may not be, lie in, or hold the pivot or a store."""
    from transformers import AutoModelForCausalLM

    require_model_dir(pivot, "pivot model")
    check_outputs(out, {"pivot model": pivot, **{f"aligned store {a}": a for a in aligned}})
    dataset = FusionDataset(aligned)
    tokenizer = check_pivot(pivot, dataset)
    out = Path(out)
    record = training_record(pivot, aligned, config)
    # float32 master weights: --bf16 is autocast mixed precision, not bf16 weights (updates
    # of lr 5e-6 would round away in bf16)
    model = AutoModelForCausalLM.from_pretrained(pivot, dtype=torch.float32)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    trainer = FusionTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        data_collator=FusionCollator(pad_id=pad_id),
        processing_class=tokenizer,
        callbacks=[*callbacks, MarkComplete(), TrainProgress()],
    )
    if isinstance(resume, str):
        checkpoint: str | None = resume
    elif trainer.is_world_process_zero():
        checkpoint = prepare_checkpoints(Path(config.output_dir), record, bool(resume))
    else:
        checkpoint = str(complete_checkpoints(Path(config.output_dir))[-1]) if resume and \
            complete_checkpoints(Path(config.output_dir)) else None
    trainer.train(resume_from_checkpoint=checkpoint)
    publish_model(trainer, tokenizer, out)  # on every process: FSDP/ZeRO-3 gather collectively
    return out


def fusion_config(output_dir: str | os.PathLike[str], **kwargs: Any) -> FusionConfig:
    """A `FusionConfig` whose checkpoints go under ``output_dir/checkpoints`` (numbers that
    YAML read as strings, ``5e-6``, become numbers)."""
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

    Everything goes through ``HfArgumentParser``: argv through its argument parser, the
    merged mapping through its dict path, so unknown keys are refused by name.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(FusionConfig)
    try:
        (parsed,) = parser.parse_args_into_dataclasses(args=["--output_dir", str(output_dir), *argv])
    except SystemExit as err:  # argparse has printed which flag it rejects
        raise ValueError(f"bad training option in {' '.join(argv)!r}") from err
    default = FusionConfig(output_dir=parsed.output_dir)
    from_argv = {
        f.name: getattr(parsed, f.name) for f in dataclasses.fields(parsed)
        if f.init and getattr(parsed, f.name) != getattr(default, f.name)
    }
    settings = {**_typed(from_file), **from_argv, **flags}
    settings.pop("output_dir", None)
    _fusion_defaults(settings)
    (config,) = parser.parse_dict({"output_dir": str(Path(output_dir) / "checkpoints"), **settings})
    return config


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


TRAIN_RUN = "train_run.json"


def read_train_run(out: str | os.PathLike[str]) -> dict[str, Any]:
    """What the training run that made the target ``out`` recorded about itself: the number
    of training processes (``world_size``), the distributed type, steps and global batch
    (empty for a target made before this file existed)."""
    path = Path(out) / TRAIN_RUN
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


LOGGED_PARTS = {"clm": "clm_loss", "fuse": "fuse_loss", "fuse_grad_share": "fuse_grad_share",
                "grad_cosine": "grad_cosine"}


def loss_parts(log_history: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """The means of what a training run logged of its two terms (None: not logged, as in
    plain CLM training): ``clm`` and ``fuse`` losses, the fusion term's share of the
    gradient at the logits and the cosine of the two gradients (`fusion.losses.gradient_parts`)."""
    out: dict[str, float | None] = {}
    for part, logged in LOGGED_PARTS.items():
        values = [float(e[logged]) for e in log_history if logged in e]
        out[part] = sum(values) / len(values) if values else None
    return out


def publish_model(trainer: Trainer, tokenizer, out: Path) -> None:
    """Save the model and the pivot's tokenizer (chat template included) atomically:
    written to a hidden sibling directory, then moved into ``out``. Call it on every
    process: under FSDP and DeepSpeed ZeRO-3 ``save_model`` gathers the sharded weights
    (a collective); only the main process writes."""
    staging = out / ".final.partial"
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(str(staging))
    write_json_atomic(staging / TRAIN_RUN, {
        "world_size": trainer.args.world_size, "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "global_step": trainer.state.global_step,
        "global_batch": trainer.args.world_size * trainer.args.per_device_train_batch_size
        * trainer.args.gradient_accumulation_steps,
        "lm_weight": trainer.args.lm_weight, "loss_parts": loss_parts(trainer.state.log_history)})
    names = sorted(p.name for p in staging.iterdir())
    # config.json last: a directory with config.json and weights looks like a model
    for name in sorted(names, key=lambda n: n == "config.json"):
        (staging / name).replace(out / name)
    staging.rmdir()
