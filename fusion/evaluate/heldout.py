"""Per-skill reply loss of one chat model on held-out conversation files.

Conversations go through `fusion.data.conversations` exactly as in training, so the loss is over the very
tokens a fused model was trained on (every assistant reply of a multi-turn conversation and
the token that closes each one), whatever the tokenizer or template, the shared FuseChat
template included: the mean negative log-likelihood per trained reply token over the whole
file (token-weighted, like the training loss).

This is what lm-evaluation-harness cannot do. Exact match of the last reply (greedy
decoding) is lm-eval's: `fusion.evaluate.lm_eval_tasks` writes the held-out files as local lm-eval
tasks and `fusion.evaluate.lm_eval_runner` runs them (``evaluate.lm_eval`` in a pipeline recipe).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fusion.backends.hf import resolve_device
from fusion.data.batching import pad_sequences, pad_token_id
from fusion.data.conversations import (
    Encoded,
    EncodeReport,
    TemplateKind,
    Turn,
    load_conversations,
    render,
    usable_rows,
)
from fusion.errors import InputError
from fusion.options import EvalOptions
from fusion.runtime.memory_faults import memory_faults_named


@dataclass(frozen=True)
class SkillScore:
    """One model's scores on one skill file.

    ``tokens`` counts the scored reply tokens (a trained token at position 0 has no
    context and is not scored); ``skipped`` counts malformed rows left out.
    """

    skill: str
    loss: float
    conversations: int
    tokens: int
    skipped: int = 0


def evaluate_model(
    model_dir: str | Path,
    skills: Mapping[str, str | Path],
    options: EvalOptions | None = None,
    *,
    template: TemplateKind = "own",
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    **overrides: Any,
) -> list[SkillScore]:
    """Score the model in ``model_dir`` (saved with its tokenizer) on each skill's file.

    ``skills`` maps a skill name to a conversation file or folder (anything
    `fusion.data.conversations.load_conversations` reads); results come back in the mapping's order.
    ``overrides`` are `EvalOptions` fields. Raises ValueError for a bad option or a skill
    file with no usable conversation.
    """
    opts = replace(options or EvalOptions(), **overrides)
    less = (f"lower batch_size (now {opts.batch_size}) or max_length (now {opts.max_length}) of the "
            "evaluation")
    with memory_faults_named(f"evaluating {model_dir}", lambda: "no score of it was written", lambda: less):
        model, tokenizer = load_model(model_dir, device, trust_remote_code=opts.trust_remote_code)
        try:  # the finally frees accelerator memory before the next model is loaded
            return [
                evaluate_skill(model, tokenizer, skill, path, opts, template=template, cache_dir=cache_dir)
                for skill, path in skills.items()
            ]
        finally:
            del model
            if resolve_device(device).type == "cuda":
                torch.cuda.empty_cache()


def load_model(model_dir: str | Path, device: str = "cpu", *, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The model in float32 (scores must not depend on the saved dtype) and its tokenizer.

    ``device`` is a torch device or ``"auto"`` (CUDA when available). A model that ships its
    own code loads only with ``trust_remote_code`` (`fusion.runtime.remote_code`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusion.runtime.remote_code import check_remote_code

    check_remote_code(model_dir, trust_remote_code)
    trust = {"trust_remote_code": trust_remote_code}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **trust)
    model.to(resolve_device(device)).eval()
    return model, AutoTokenizer.from_pretrained(model_dir, **trust)


def evaluate_skill(
    model: Any,
    tokenizer: Any,
    skill: str,
    path: str | Path,
    options: EvalOptions | None = None,
    *,
    template: TemplateKind = "own",
    cache_dir: str | Path | None = None,
) -> SkillScore:
    """Scores of a loaded model on one conversation file."""
    opts = options or EvalOptions()
    examples, report = prepare_examples(
        _load_rows(path, cache_dir), tokenizer, template=template, max_length=opts.max_length, source=str(path)
    )
    skipped = report.skipped_rows
    if not examples:
        first = next(iter(report.skipped.items()), None)
        why = f"; the first, row {first[0]}: {first[1]}" if first else ""
        hint = (f" (max_length {opts.max_length} ends before every reply: raise it)"
                if first and "within the first" in first[1] else "")
        raise InputError(f"{path}: no usable conversation, all {skipped} rows skipped{why}{hint}")
    nll, tokens = reply_nll(model, examples, pad_id=pad_token_id(tokenizer), batch_size=opts.batch_size)
    if tokens == 0:  # only when every reply opens its row: position 0 has no context
        raise InputError(f"{path}: no reply token has context to be scored", file=str(path))
    return SkillScore(skill, nll / tokens, len(examples), tokens, skipped)


def _load_rows(path: str | Path, cache_dir: str | Path | None) -> Any:
    """Rows of a skill file; load failures name the file (``datasets`` often does not)."""
    try:
        return load_conversations(
            str(path), cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except StopIteration as err:  # how `datasets` fails on a zero-byte JSON file
        raise InputError(f"{path}: no usable conversation (the file is empty)", file=str(path)) from err
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise InputError(f"{path}: {err}", file=str(path)) from err


# --------------------------------------------------------------------------- conversations


def prepare_examples(
    rows: Iterable[Mapping], tokenizer: Any, *, template: TemplateKind, max_length: int,
    source: str | None = None,
) -> tuple[list[Encoded], EncodeReport]:
    """The usable conversations, encoded as for training, and the report of the rows skipped."""

    def encode(rid: str, turns: list[Turn]) -> Encoded:
        return render(tokenizer, turns, template=template, max_length=max_length, row_id=rid)

    report = EncodeReport()
    examples = [e for _, e in usable_rows(rows, encode, report=report, source=source)]
    return examples, report


# --------------------------------------------------------------------------- loss


@torch.inference_mode()
def reply_nll(
    model: Any, encoded: Sequence[Encoded], *, pad_id: int = 0, batch_size: int = 16
) -> tuple[float, int]:
    """Summed NLL (float32 log-softmax) of the trained tokens, and how many there are.

    Token t+1 is scored from the logits at t wherever ``loss_mask[t+1]``; right padding
    cannot leak into real positions of a causal model.
    """
    device = model.device
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, mask = pad_sequences([e.input_ids for e in chunk], pad_id)
        targets = torch.zeros_like(ids, dtype=torch.bool)
        for row, e in enumerate(chunk):
            targets[row, : len(e.loss_mask)] = torch.as_tensor(e.loss_mask)
        ids, mask, targets = ids.to(device), mask.to(device), targets[:, 1:].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logprobs = torch.log_softmax(logits[targets].float(), dim=-1)
        gold = logprobs.gather(1, ids[:, 1:][targets][:, None]).squeeze(1)
        total -= float(gold.sum())
        count += int(targets.sum())
    return total, count


# --------------------------------------------------------------------------- transfer


@torch.inference_mode()
def transfer_scores(
    model: Any, tokenizer: Any, aligned: Mapping[str, str | Path], *, temperature: float = 1.0,
    batch_size: int = 16,
) -> dict[str, dict[str, float | int | None]]:
    """The transfer measure (`fusion.evaluate.transfer`) of a loaded model against each source, on
    one skill file: ``aligned`` maps a source name to its store of that file aligned to the
    pivot's (all from the same pivot store). The model must share the pivot's tokenizer: it
    reads the pivot's token ids. Returns source → ``{"kl", "cover", "positions"}``."""
    from fusion.artifacts.logit_store import tokenizer_fingerprint
    from fusion.evaluate.transfer import TransferSums, transfer_sums
    from fusion.train.data import FusionCollator, FusionDataset

    names = list(aligned)
    data = FusionDataset([aligned[n] for n in names])
    if tokenizer_fingerprint(tokenizer) != data.pivot_fingerprint:
        raise InputError(f"{data.stores[0].path}: aligned to a pivot with another tokenizer than the model's; "
                         "the transfer measure reads the pivot's token ids")
    collate = FusionCollator(pad_token_id(tokenizer))
    sums = [TransferSums() for _ in names]
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        ids = batch["input_ids"].to(model.device)
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(model.device)).logits.cpu()
        trained = torch.zeros_like(batch["teacher_valid"][:, 0])
        trained[:, :-1] = batch["labels"][:, 1:] != -100  # position t predicts trained token t + 1
        for i in range(len(names)):
            valid = batch["teacher_valid"][:, i + 1] & trained
            sums[i] = sums[i].add(transfer_sums(logits, batch["teacher_ids"][:, i + 1],
                                                batch["teacher_logprobs"][:, i + 1], valid,
                                                temperature=temperature))
    return {name: total.means() for name, total in zip(names, sums, strict=True)}


# --------------------------------------------------------------------------- right answers

@torch.inference_mode()
def right_answer_mass(
    model: Any, tokenizer: Any, path: str | Path, *, template: TemplateKind = "own", max_length: int = 512,
    cache_dir: str | Path | None = None,
) -> float | None:
    """Mean over a skill file's conversations of the probability that the model's last reply
    starts with a right answer, teacher-forced: for a skill where many replies are right
    (each row lists them in ``answers``), the sum over the right answers' distinct starts
    of the probability of the tokens from the end of the prompt (the chat template's
    generation prompt, its lead-in such as a lone '▁' included) up to the one holding the
    answer's first character. A model that spreads its first step over the whole set scores
    as high as one that always picks the same member; mass on wrong answers lowers it.
    None when the file's rows list no ``answers``."""
    from fusion.data.conversations import parse_turns, row_id
    from fusion.evaluate.lm_eval_tasks import right_answers

    rows = _load_rows(path, cache_dir)
    masses: list[float] = []
    for index, row in enumerate(rows):
        if row.get("answers") is None:
            continue
        rid = row_id(row, index)
        turns = parse_turns(row, rid)
        last = max(i for i, t in enumerate(turns) if t.role == "assistant")
        try:
            answers = right_answers(row, turns[last].content)
        except ValueError as err:
            raise InputError(f"{path}: row {rid}: {err}") from None
        paths = {}
        for answer in dict.fromkeys(a.strip() for a in answers):
            changed = [*turns[:last], replace(turns[last], content=answer), *turns[last + 1:]]
            enc = render(tokenizer, changed, template=template, max_length=max_length, row_id=rid)
            begin, first = _answer_start(tokenizer, changed[:last], enc, template)
            if first is None or first >= len(enc.input_ids) or begin < 1:
                raise InputError(f"{path}: row {rid}: the reply {answer!r} starts beyond max_length {max_length}")
            paths[tuple(enc.input_ids[: first + 1])] = begin
        masses.append(_paths_mass(model, paths, pad_token_id(tokenizer)))
    return sum(masses) / len(masses) if masses else None


def _answer_start(tokenizer: Any, history: Sequence[Turn], enc: Encoded, template: TemplateKind) -> tuple[int, int | None]:
    """(first token after the prompt, the token holding the reply's first character): the
    prompt as the model's own template renders it for generation, else (the shared template,
    or a render that does not start with it) the reply's own start."""
    reply = enc.reply_spans[-1][0]
    start = reply
    if template == "own":
        messages = [{"role": t.role, "content": t.content} for t in history]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if enc.text.startswith(prompt) and len(prompt) <= reply:
            start = len(prompt)
    begin = next((i for i, (a, _) in enumerate(enc.token_offsets) if a >= start), len(enc.input_ids))
    first = next((i for i, (_, end) in enumerate(enc.token_offsets) if end > reply), None)
    return min(begin, first if first is not None else begin), first


def _paths_mass(model: Any, paths: Mapping[tuple[int, ...], int], pad_id: int) -> float:
    """Σ over ``paths`` (token ids up to an answer's first-character token → where its reply
    begins) of the probability of the reply tokens, one forward pass for all of them. The
    paths part at or before their last token, so these events are disjoint."""
    sequences = list(paths)
    padded, mask = pad_sequences([list(s) for s in sequences], pad_id)
    padded, mask = padded.to(model.device), mask.to(model.device)
    logprobs = torch.log_softmax(model(input_ids=padded, attention_mask=mask).logits.float(), dim=-1)
    total = 0.0
    for row, seq in enumerate(sequences):
        steps = torch.arange(paths[seq], len(seq), device=padded.device)
        total += float(torch.exp(logprobs[row, steps - 1, padded[row, steps]].double().sum()))
    return total
