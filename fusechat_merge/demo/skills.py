"""Tiny skilled chat models for the embedded FuseChat demo, trained locally in seconds.

FuseChat fuses what several source models know into a competent pivot. To show that on a
laptop, the demo needs sources that each know something the pivot knows only weakly, with
different architectures and tokenizers. Here each source learns one synthetic skill
(arithmetic, word reversal, or pick: a letter from those the prompt lists, where five to
seven replies are right) from conversations generated in code; the pivot is a chat model of
the same toy world that has seen a little of arithmetic and reversal (weak, not zero at
them) and nothing of pick. Pick is where FuseChat's claim can show: its source learnt from
replies drawn uniformly from the set, so its next-token distribution carries the whole set
where a gold reply shows one member.

Every skill has three disjoint sets of prompts: held-out (the reported numbers), validation
(for choosing settings) and the rest (training rows of the sources, the pivot and the
fusion corpus).
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SKILLS: tuple[str, ...] = ("arithmetic", "reversal", "pick")
# Letters that no toy tokenizer merges into pairs, so each letter is one token to move.
LETTERS = "bfkmvy"
# pick: the prompt lists PICK_SIZE distinct letters of the alphabet; every one of them is a
# right reply (a skill where many replies are right, unlike the two above).
PICK_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
PICK_SIZE = (5, 7)
MAX_OPERAND = 19
HELDOUT_SEED_OFFSET = 10_000
VALID_SEED_OFFSET = 20_000
PIVOT_SEED_OFFSET = 7
N_HELDOUT = 50
MAX_LENGTH = 128
TOPICS: tuple[tuple[str, int], ...] = (
    ("foxes", 0),
    ("model merging", 1),
    ("merge methods", 2),
    ("python", 3),
    ("greetings", 4),
    ("chat", 5),
    ("knowledge fusion", 6),
)


@dataclass(frozen=True)
class ModelSpec:
    """How one demo model is built: architecture, tokenizer and what it is trained on."""

    name: str
    arch: str
    tokenizer_kind: str
    vocab_size: int
    skill: str | None


# Different tokenizers: pivot metaspace (550 tokens), byte-level (400), metaspace (506).
SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("pivot", "llama", "metaspace", 400, None),
    ModelSpec("arithmetic", "qwen2", "bytelevel", 400, "arithmetic"),
    ModelSpec("reversal", "mistral", "metaspace", 250, "reversal"),
    ModelSpec("pick", "qwen2", "bytelevel", 300, "pick"),
)
# Eight heads without grouped KV: in tuning, arithmetic generalised in fewer steps than with
# toy's default of 4 query heads sharing 2 KV heads (0.88 vs 0.74 held-out after 1000 steps).
MODEL_SIZE: dict[str, int] = {"hidden_size": 64, "layers": 2, "heads": 8, "kv_heads": 8}
# Tuned on a 2-core CPU: arithmetic needs the most steps to generalise to held-out sums.
DEFAULT_STEPS: dict[str, int] = {"pivot": 1200, "arithmetic": 1200, "reversal": 400, "pick": 800}
# Training rows of each source: pick's source sees 8000 rows (one reply each, drawn from the
# set) so that it learns the set rather than memorising which member a row showed (on 2000
# rows and 800 steps its training loss fell below a uniform choice's). With 800 steps its
# greedy reply is right for 0.88 of the held-out prompts, and its first reply token puts
# 0.38 of its mass on the listed letters (the rest spreads over other letters): it knows
# the set softly, which is what its distribution teaches.
SOURCE_ROWS: dict[str, int] = {"arithmetic": 2000, "reversal": 2000, "pick": 8000}
# What the pivot sees of each skill besides its 2000 chat rows: enough to be weak, not zero
# (validation exact match 0.20 arithmetic, 0.12 reversal; the sources reach 0.9-1.0).
PIVOT_SKILL_ROWS: dict[str, int] = {"arithmetic": 1000, "reversal": 150}


# --------------------------------------------------------------------------- conversations


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    if rng.random() < 0.5:
        return f"{a}+{b}=", str(a + b)
    a, b = max(a, b), min(a, b)  # non-negative results keep the answers short
    return f"{a}-{b}=", str(a - b)


def _reversal(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
    return f"reverse {word}", word[::-1]


def _pick(rng: random.Random) -> tuple[str, str]:
    """A reply drawn uniformly from the letters the prompt lists: a source trained on these
    rows spreads its next-token distribution over the whole set, where one row shows one."""
    letters = rng.sample(PICK_ALPHABET, rng.randint(*PICK_SIZE))
    return f"pick one of {' '.join(letters)}", rng.choice(letters)


def pick_answers(prompt: str) -> list[str]:
    """Every right reply to a pick prompt: the letters it lists."""
    return prompt.split()[3:]


def _generic(rng: random.Random) -> tuple[str, str]:
    from fusechat_merge.demo.toy import CORPUS

    topic, index = rng.choice(TOPICS)
    return f"Tell me about {topic}.", CORPUS[index]


_MAKERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "reversal": _reversal,
    "pick": _pick,
    "generic": _generic,
}
# skills where many replies are right: each row lists them in "answers" (lm-eval's check of
# the reply is then membership, see fusion.evaluate.lm_eval_tasks)
_ANSWER_SETS: dict[str, Callable[[str], list[str]]] = {"pick": pick_answers}


def _stream(skill: str, seed: int) -> Iterator[tuple[str, str]]:
    """Endless (prompt, answer) pairs; a string seed is stable across runs and platforms."""
    if skill not in _MAKERS:
        raise ValueError(f"unknown skill {skill!r}; use one of {', '.join(_MAKERS)}")
    rng = random.Random(f"{skill}-{seed}")
    while True:
        yield _MAKERS[skill](rng)


def _row(skill: str, seed: int, i: int, prompt: str, answer: str) -> dict:
    row = {
        "id": f"{skill}-{seed}-{i}",
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ],
    }
    if skill in _ANSWER_SETS:
        row["answers"] = _ANSWER_SETS[skill](prompt)
    return row


def skill_conversations(skill: str, n: int, seed: int) -> list[dict]:
    """``n`` single-turn conversations exercising ``skill``, the same for the same seed.

    ``skill`` is one of SKILLS, or ``"generic"`` for the plain chat the pivot learns.
    """
    pairs = itertools.islice(_stream(skill, seed), n)
    return [_row(skill, seed, i, p, a) for i, (p, a) in enumerate(pairs)]


def _distinct(skill: str, stream_seed: int, n: int, exclude: set[str]) -> list[dict]:
    """``n`` rows of distinct prompts from one stream, none of them in ``exclude``."""
    rows: dict[str, dict] = {}
    draws = enumerate(itertools.islice(_stream(skill, stream_seed), 1000 * (n + 1)))
    for i, (prompt, answer) in draws:
        if len(rows) == n:
            break
        if prompt not in exclude:
            rows.setdefault(prompt, _row(skill, stream_seed, i, prompt, answer))
    if len(rows) < n:
        raise ValueError(f"{skill} has fewer than {n} distinct prompts left")
    return list(rows.values())


def training_rows(skill: str, n: int, stream_seed: int, exclude: set[str]) -> list[dict]:
    """``n`` rows of stream ``stream_seed`` whose prompts are not in ``exclude`` (repeats
    allowed; ids keep their stream index)."""
    rows = (
        _row(skill, stream_seed, i, p, a)
        for i, (p, a) in enumerate(_stream(skill, stream_seed))
        if p not in exclude
    )
    return list(itertools.islice(rows, n))


def prompts(rows: Sequence[dict]) -> set[str]:
    """The first user turn of each row: what makes two splits overlap."""
    return {row["messages"][0]["content"] for row in rows}


def train_heldout(
    skill: str, n_train: int, n_heldout: int = N_HELDOUT, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out conversations, so exact match measures the skill.

    Held-out rows come from seed ``seed + HELDOUT_SEED_OFFSET`` with distinct prompts; train
    rows from ``seed`` minus any prompt in the held-out set (ids keep their stream index).
    """
    held = _distinct(skill, seed + HELDOUT_SEED_OFFSET, n_heldout, set())
    return training_rows(skill, n_train, seed, prompts(held)), held


def validation_rows(skill: str, n: int = N_HELDOUT, seed: int = 0) -> list[dict]:
    """Distinct prompts for choosing settings, disjoint from the held-out set of ``seed``;
    the pivot and the fusion corpus never see them (the sources may: they are given)."""
    held = train_heldout(skill, 0, N_HELDOUT, seed)[1]
    return _distinct(skill, seed + VALID_SEED_OFFSET, n, prompts(held))


# --------------------------------------------------------------------------- encoding


def _prompt_text(tokenizer: Any, messages: Sequence[dict]) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def encode_for_training(tokenizer: Any, row: dict) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` with labels only on what the model must emit for the reply.

    That is ``render``'s loss mask plus any template text between the generation prompt and
    the reply (the Llama template's space before a reply, a lone '▁' token): greedy decoding
    from the prompt has to produce it, so it must be learned too.
    """
    from fusion.data.conversations import parse_turns, render

    enc = render(
        tokenizer,
        parse_turns(row, row["id"]),
        template="own",
        max_length=MAX_LENGTH,
        row_id=row["id"],
    )
    prompt = _prompt_text(tokenizer, row["messages"][:-1])
    start = len(prompt) if enc.text.startswith(prompt) else enc.reply_spans[-1][0]
    reply_at = enc.reply_spans[-1][0]
    mask = [
        m or (start <= a < b <= reply_at)
        for m, (a, b) in zip(enc.loss_mask, enc.token_offsets, strict=True)
    ]
    return enc.input_ids, [t if m else -100 for t, m in zip(enc.input_ids, mask, strict=True)]


def _batch(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors; padding is masked out of attention and loss."""
    from fusion.data.batching import pad_sequences

    ids, attention = pad_sequences([ids for ids, _ in encoded], pad_id)
    labels, _ = pad_sequences([labels for _, labels in encoded], -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


# --------------------------------------------------------------------------- training


def train_causal_lm(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict],
    *,
    steps: int,
    seed: int = 0,
    lr: float = 3e-3,
    batch_size: int = 32,
) -> float:
    """Plain causal-LM fine-tuning on the replies; returns the mean loss of the last steps.

    Short warm-up, cosine decay, beta2 0.95 and weight decay 0.1: against AdamW's defaults
    these made the arithmetic model generalise to held-out sums in about half the steps.
    """
    import math

    import torch

    torch.manual_seed(seed)
    encoded = [encode_for_training(tokenizer, row) for row in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        ),
    )
    model.train()
    losses: list[float] = []
    for _ in range(steps):
        picks = torch.randint(len(encoded), (batch_size,)).tolist()
        loss = model(**_batch([encoded[i] for i in picks], tokenizer.pad_token_id)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return sum(tail) / len(tail)


# --------------------------------------------------------------------------- evaluation


def exact_match(model_dir: str | Path, rows: Sequence[dict], *, max_new_tokens: int = 16) -> float:
    """Share of rows whose greedy reply equals the reference reply (both stripped), scored
    by lm-evaluation-harness: the rows become a local ``generate_until`` task
    (`fusion.evaluate.lm_eval_tasks`) under the model's chat template."""
    import tempfile

    from fusion.artifacts.atomic import write_jsonl_atomic
    from fusion.evaluate.lm_eval_options import LmEvalOptions
    from fusion.evaluate.lm_eval_results import metrics_by_task
    from fusion.evaluate.lm_eval_runner import run_lm_eval
    from fusion.evaluate.lm_eval_tasks import write_skill_tasks

    if not rows:
        raise ValueError("exact match needs at least one row")
    with tempfile.TemporaryDirectory(prefix="fusechat-em-") as tmp:
        data = write_jsonl_atomic(Path(tmp) / "rows.jsonl", rows)
        tasks = write_skill_tasks({"skill": data}, Path(tmp) / "tasks", max_gen_toks=max_new_tokens,
                                  cache_dir=Path(tmp) / "cache")
        task = tasks.by_skill()["skill"].generate
        options = LmEvalOptions(tasks=(task,), include_path=str(tasks.include_path), apply_chat_template=True,
                                bootstrap_iters=0, device="cpu", batch_size=16)
        with torch_threads(1):
            return metrics_by_task(run_lm_eval(str(model_dir), options))[task]["exact_match"]


# --------------------------------------------------------------------------- demo models


def _build(spec: ModelSpec, path: Path, seed: int, steps: int, log: Callable[[str], None]) -> None:
    """Make, train and save one demo model; the log line says how well it learned.

    The model is a whole output of the one output lifecycle (`fusion.artifacts.lifecycle`):
    built in a staging directory published at the end, so a folder with a config.json is
    always a complete, trained model; a concurrent build that finished first is reused.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusechat_merge.demo.toy import make_model, make_tokenizer
    from fusion.artifacts.lifecycle import DONE, MODEL_RUN_FILE, Output, writing

    started = time.perf_counter()
    if path.exists() and not (path / "config.json").exists():
        shutil.rmtree(path)  # an incomplete leftover of an older version
    record = {"model": spec.name, "arch": spec.arch, "tokenizer": spec.tokenizer_kind, "seed": seed, "steps": steps}
    with writing(Output(path, f"the demo model {spec.name}", record, whole=True, record_file=MODEL_RUN_FILE)) as made:
        if made.state == DONE:
            return
        tmp = made.dir
        tokenizer = make_tokenizer(spec.tokenizer_kind, vocab_size=spec.vocab_size)
        make_model(tmp, spec.arch, tokenizer=tokenizer, seed=seed, **MODEL_SIZE)
        model = AutoModelForCausalLM.from_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        rows, evals = _training_rows(spec, seed)
        loss = train_causal_lm(model, tokenizer, rows, steps=steps, seed=seed)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    scores = ", ".join(f"{k} {exact_match(path, v, max_new_tokens=48):.2f}" for k, v in evals.items())
    log(
        f"{spec.name:<10}: {spec.arch}, {len(tokenizer)} tokens, {steps} steps, loss {loss:.3f}, "
        f"exact match {scores} ({time.perf_counter() - started:.1f}s)"
    )


def _training_rows(spec: ModelSpec, seed: int) -> tuple[list[dict], dict[str, list[dict]]]:
    """Training rows and the rows to report exact match on (skills always held-out)."""
    if spec.skill is not None:
        rows, held = train_heldout(spec.skill, SOURCE_ROWS[spec.skill], N_HELDOUT, seed)
        return rows, {spec.skill: held}
    rows = skill_conversations("generic", 2000, seed)
    evals = {skill: train_heldout(skill, 0, N_HELDOUT, seed)[1] for skill in SKILLS}
    for skill, n in PIVOT_SKILL_ROWS.items():
        unseen = prompts(evals[skill]) | prompts(validation_rows(skill, seed=seed))
        rows += training_rows(skill, n, seed + PIVOT_SEED_OFFSET, unseen)
    return rows, {**evals, "seen chat": rows[:20]}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch threads: these matmuls are too small to share, and on a busy
    2-core machine two spinning OpenMP threads made training and decoding 10-80x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_demo_models(
    work_dir: Path,
    *,
    seed: int = 0,
    train_steps: int | None = None,
    log: Callable[[str], None] = print,
    workers: int | None = None,
) -> dict[str, Path]:
    """The demo's pivot and its skilled sources (`SPECS`) as model folders under ``work_dir``.

    A folder with a config.json is complete (saves are atomic) and is reused as is.
    ``train_steps=None`` trains each model its tuned DEFAULT_STEPS; an int trains every
    model that many steps (for quick smoke runs, which will not learn the skills).
    The models do not depend on each other: ``workers`` processes (default: up to 2, one per
    core) build them side by side, each with one torch thread, longest first, so each model
    is what a build alone makes.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    paths = {spec.name: work_dir / spec.name for spec in SPECS}
    todo = []
    for spec in SPECS:
        path = paths[spec.name]
        if (path / "config.json").exists():
            log(f"{spec.name:<10}: reusing {path}")
            continue
        todo.append((spec, path, seed, DEFAULT_STEPS[spec.name] if train_steps is None else train_steps))
    todo.sort(key=lambda job: -job[3])
    workers = min(2, os.cpu_count() or 1, len(todo)) if workers is None else min(workers, len(todo))
    if workers <= 1:
        for job in todo:
            log(_build_alone(*job))
        return paths
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for line in pool.map(_build_alone, *zip(*todo, strict=True)):
            log(line)
    return paths


def _build_alone(spec: ModelSpec, path: Path, seed: int, steps: int) -> str:
    """`_build` with one torch thread (in this process or a worker); returns its log line."""
    lines: list[str] = []
    with torch_threads(1):
        _build(spec, path, seed, steps, lines.append)
    return lines[0] if lines else f"{spec.name:<10}: reusing {path}"
