"""Per-skill evaluation of one chat model: reply loss and greedy exact match.

The whole-pipeline report compares merge methods (the paper's table, at toy scale) by
scoring each model on held-out conversation files, one file per skill. Conversations go
through `fusion.data` exactly as in training, so the loss is over the very tokens a fused
model was trained on (assistant replies and the token that closes each one), whatever the
tokenizer or template.

Two scores per skill:

* ``loss``: mean negative log-likelihood per trained reply token over the whole file
  (token-weighted, so long replies count more, like the training loss).
* ``exact_match``: the fraction of conversations whose last assistant reply greedy
  decoding reproduces exactly (after ``strip``), from the prompt a user would send.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fusion.backends.hf import resolve_device
from fusion.batching import pad_sequences, pad_token_id
from fusion.data import (
    SHARED_HEADS,
    Encoded,
    EncodeReport,
    TemplateKind,
    Turn,
    chat_messages,
    end_of_turn_ids,
    load_conversations,
    render,
    render_shared,
    usable_rows,
    with_system_fallback,
)
from fusion.options import EvalOptions


@dataclass(frozen=True)
class SkillScore:
    """One model's scores on one skill file.

    ``tokens`` counts the scored reply tokens (a trained token at position 0 has no
    context and is not scored); ``skipped`` counts malformed rows left out.
    """

    skill: str
    loss: float
    exact_match: float | None
    conversations: int
    tokens: int
    skipped: int = 0


@dataclass(frozen=True)
class Example:
    """A usable conversation: its training encoding and the last reply's prompt/reference."""

    encoded: Encoded
    prompt: str
    reference: str


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
    `fusion.data.load_conversations` reads); results come back in the mapping's order.
    ``overrides`` are `EvalOptions` fields. Raises ValueError for a bad option or a skill
    file with no usable conversation.
    """
    opts = replace(options or EvalOptions(), **overrides)
    model, tokenizer = load_model(model_dir, device)
    try:  # the finally frees accelerator memory before the next model is loaded
        return [
            evaluate_skill(model, tokenizer, skill, path, opts, template=template, cache_dir=cache_dir)
            for skill, path in skills.items()
        ]
    finally:
        del model
        if resolve_device(device).type == "cuda":
            torch.cuda.empty_cache()


def load_model(model_dir: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """The model in float32 (scores must not depend on the saved dtype) and its tokenizer.

    ``device`` is a torch device or ``"auto"`` (CUDA when available).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.to(resolve_device(device)).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


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
    max_length, batch_size, max_new_tokens = opts.max_length, opts.batch_size, opts.max_new_tokens
    examples, skipped = prepare_examples(
        _load_rows(path, cache_dir), tokenizer, template=template, max_length=max_length
    )
    if not examples:
        raise ValueError(f"{path}: no usable conversation ({skipped} malformed rows skipped)")
    nll, tokens = reply_nll(
        model, [e.encoded for e in examples], pad_id=pad_token_id(tokenizer), batch_size=batch_size
    )
    if tokens == 0:  # only when every reply opens its row: position 0 has no context
        raise ValueError(f"{path}: no reply token has context to be scored")
    match = None
    if opts.exact_match:
        match = exact_match_rate(
            model,
            tokenizer,
            [e.prompt for e in examples],
            [e.reference for e in examples],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
    return SkillScore(skill, nll / tokens, match, len(examples), tokens, skipped)


def _load_rows(path: str | Path, cache_dir: str | Path | None) -> Any:
    """Rows of a skill file; load failures name the file (``datasets`` often does not)."""
    try:
        return load_conversations(
            str(path), cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except StopIteration as err:  # how `datasets` fails on a zero-byte JSON file
        raise ValueError(f"{path}: no usable conversation (the file is empty)") from err
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: {err}") from err


# --------------------------------------------------------------------------- conversations


def prepare_examples(
    rows: Iterable[Mapping], tokenizer: Any, *, template: TemplateKind, max_length: int
) -> tuple[list[Example], int]:
    """The usable conversations and the number of malformed rows skipped.

    A row is skipped when it cannot be used for either score, so both scores are over the
    same conversations.
    """

    def example(rid: str, turns: list[Turn]) -> Example:
        encoded = render(tokenizer, turns, template=template, max_length=max_length, row_id=rid)
        last = last_reply_index(turns)
        prompt = generation_prompt(tokenizer, turns[:last], turns[last], template, rid)
        return Example(encoded, prompt, turns[last].content)

    report = EncodeReport()
    examples = [e for _, e in usable_rows(rows, example, report=report)]
    return examples, report.skipped_rows


def last_reply_index(turns: Sequence[Turn]) -> int:
    """Index of the last assistant turn (`parse_turns` guarantees there is one)."""
    return max(i for i, t in enumerate(turns) if t.role == "assistant")


def generation_prompt(
    tokenizer: Any, history: Sequence[Turn], reply: Turn, template: TemplateKind, rid: str = "?"
) -> str:
    """The text a user would send to get ``reply`` after ``history``.

    ``own``: the chat template with its generation prompt; a template that refuses a system
    turn gets it folded into the first user turn, as `fusion.data.render` does.
    ``shared``: the shared render of ``history`` plus the assistant head, cut back to where
    training tokenization starts the reply's first token. Most tokenizers fuse the head's
    trailing space into that token ('▁The', 'ĠThe'); a prompt ending in a bare space token
    is one the model never saw (OpenChat's own generation prompt likewise ends with ':').
    """
    if template == "shared":
        head = render_shared(tokenizer, history)[0] + SHARED_HEADS["assistant"]
        return head[: token_start(tokenizer, head + reply.content, len(head))]
    if template != "own":
        raise ValueError(f"unknown template {template!r}; use 'own' or 'shared'")

    def prompt(turns: Sequence[Turn]) -> str:
        return tokenizer.apply_chat_template(
            chat_messages(turns, None), add_generation_prompt=True, tokenize=False
        )

    return with_system_fallback(prompt, history, rid, "prompt")


def token_start(tokenizer: Any, text: str, char: int) -> int:
    """Start of the token of ``text`` that covers character ``char`` (``char`` if none)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    for a, b in offsets["offset_mapping"]:
        if a < b and b > char:
            return min(a, char)
    return char


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


# --------------------------------------------------------------------------- exact match


def until_end_of_turn(ids: Sequence[int], stop_ids: frozenset[int]) -> list[int]:
    """The generated ids before the first end-of-turn / eos / other special token."""
    out: list[int] = []
    for i in ids:
        if i in stop_ids:
            break
        out.append(i)
    return out


@torch.inference_mode()
def generate_replies(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[str]:
    """Greedy replies to ``prompts`` (left-padded batches), cut at the first end of turn."""
    stop_ids = end_of_turn_ids(tokenizer)
    pad_id = pad_token_id(tokenizer)
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [
            tokenizer(p, add_special_tokens=False)["input_ids"]
            for p in prompts[start : start + batch_size]
        ]
        ids, mask = pad_sequences(chunk, pad_id, left=True)
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=sorted(stop_ids) or None,
        )
        for row in out[:, ids.shape[1] :].tolist():
            kept = until_end_of_turn(row, stop_ids)
            replies.append(tokenizer.decode(kept, skip_special_tokens=True))
    return replies


def exact_match_rate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    references: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> float:
    """Share of prompts whose greedy reply equals its reference (both ``strip``-ed)."""
    replies = generate_replies(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    hits = sum(r.strip() == ref.strip() for r, ref in zip(replies, references, strict=True))
    return hits / max(1, len(prompts))
