"""Held-out conversation files as local lm-evaluation-harness tasks (YAML + JSON lines).

Each skill file (anything `fusion.data.conversations.load_conversations` reads) becomes two lm-eval tasks
over one JSONL of documents ``{id, system, prompt, reference}``, where ``prompt`` is the
user turn that the last assistant reply answers and ``reference`` is that reply:

* ``<prefix>_<skill>_gen`` (``generate_until``): greedy decoding from the prompt, stopped
  at the tokenizer's eos, scored with lm-eval's ``exact_match`` with leading and trailing
  whitespace ignored (what our own evaluator compared after ``strip``). A skill where many
  replies are right lists them in each row's ``answers``: the reply is then right when it
  is any of them (the rate of right replies, still in the ``exact_match`` column).
* ``<prefix>_<skill>_ll`` (``loglikelihood``): the log-likelihood of the reference reply
  given the prompt; lm-eval reports it as ``perplexity`` (exp of minus the mean per-reply
  log-likelihood) and ``acc`` (whether greedy decoding would give the reply token by token).

All tasks carry the tag ``<prefix>_skills``, so ``--tasks <prefix>_skills`` runs them all.
They are written for ``--apply-chat-template``: the document's ``system`` becomes the
system message and ``prompt`` the user message of each model's own chat template.

What lm-eval's prompt cannot hold is left out and counted: conversations with more than
one user turn before the last reply (an lm-eval document has a single user message).
The generated YAML names its data file by absolute path (lm-eval resolves ``data_files``
against the working directory, not the YAML's folder), so move the folder by writing it
again. This module does not import lm-eval.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion.artifacts.atomic import write_jsonl_atomic, write_text_atomic
from fusion.data.conversations import MalformedRow, parse_turns, row_id
from fusion.errors import InputError

PREFIX = "fusechat"
GENERATE = "gen"
LOGLIKELIHOOD = "ll"
EXACT_MATCH = "exact_match"
RIGHT_MASS = "right_answer_mass"
# lm-eval's exact_match applies these to predictions and references alike.
_STRIP_REGEXES = [r"^\s+", r"\s+$"]


@dataclass(frozen=True)
class SkillTask:
    """The two lm-eval tasks made from one skill file."""

    skill: str
    generate: str
    loglikelihood: str
    data: Path
    documents: int
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [self.generate, self.loglikelihood]


@dataclass(frozen=True)
class SkillTasks:
    """What `write_skill_tasks` wrote: pass ``include_path`` and ``task_names`` to lm-eval."""

    include_path: Path
    tag: str
    skills: tuple[SkillTask, ...]

    @property
    def task_names(self) -> list[str]:
        return [name for task in self.skills for name in task.names]

    def by_skill(self) -> dict[str, SkillTask]:
        return {task.skill: task for task in self.skills}


def task_name(prefix: str, skill: str, kind: str) -> str:
    """``prefix_skill_kind`` with anything but letters, digits and ``_`` made ``_``."""
    return "_".join(_slug(part) for part in (prefix, skill, kind))


def exact_match_column(skill: str, prefix: str = PREFIX) -> str:
    """The results column (``task/metric``) of a skill's exact match: its generate task's."""
    return f"{task_name(prefix, skill, GENERATE)}/{EXACT_MATCH}"


def right_mass_column(skill: str) -> str:
    """The results column of a skill's mass on right first answer tokens (ours, teacher-forced:
    `fusion.evaluate.heldout.right_answer_mass`), for skills whose rows list every right reply."""
    return f"{skill}/{RIGHT_MASS}"


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")
    if not slug:
        raise InputError(f"{text!r} has no letter or digit to name a task with", key=text)
    return slug


def skill_documents(rows: Iterable[Mapping]) -> tuple[list[dict[str, str]], dict[str, str]]:
    """lm-eval documents of the usable rows, and ``{row id: reason}`` for the rows left out.

    A document is the last assistant reply and the single user turn (plus an optional
    system turn) before it; `fusion.data.conversations.parse_turns` decides what is malformed, exactly as
    for training and for `fusion.evaluate.heldout`.
    """
    docs: list[dict[str, str]] = []
    skipped: dict[str, str] = {}
    for index, row in enumerate(rows):
        rid = row_id(row, index)
        try:
            turns = parse_turns(row, rid)
        except MalformedRow as err:
            skipped[rid] = err.reason
            continue
        last = max(i for i, t in enumerate(turns) if t.role == "assistant")
        history = turns[:last]
        system = history[0].content if history and history[0].role == "system" else ""
        users = [t for t in history if t.role != "system"]
        if len(users) != 1:
            skipped[rid] = (
                f"{len(users)} user turns before the last reply; an lm-eval document holds one"
            )
            continue
        doc = {"id": rid, "system": system, "prompt": users[0].content, "reference": turns[last].content}
        if row.get("answers") is not None:  # `datasets` gives rows without it None
            try:
                doc["answers"] = right_answers(row, doc["reference"])
            except ValueError as err:
                skipped[rid] = str(err)
                continue
        docs.append(doc)
    if docs and len({"answers" in d for d in docs}) > 1:
        raise ValueError("some rows list their right replies ('answers') and others do not: one kind per file")
    return docs, skipped


def right_answers(row: Mapping, reference: str) -> list[str]:
    """A row's ``answers``: every right reply to its last prompt (a skill where many replies
    are right), a non-empty list of strings that holds the gold reply."""
    answers = row["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError("'answers' must be a non-empty list of strings (every right reply)")
    if reference.strip() not in {a.strip() for a in answers}:
        raise ValueError(f"the reply {reference!r} is not among its 'answers'")
    return list(answers)


def task_configs(
    name_gen: str,
    name_ll: str,
    data: Path,
    *,
    tag: str,
    max_gen_toks: int = 32,
    cache_dir: str | os.PathLike | None = None,
    answers: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The generate_until and loglikelihood task configs over one JSONL file. With
    ``answers`` (documents that list every right reply), the generated reply is scored
    right when it is any of them: lm-eval's exact_match over a list of targets counts a
    match with any (the log-likelihood task keeps the gold reply)."""
    dataset_kwargs: dict[str, Any] = {"data_files": {"test": str(Path(data).resolve())}}
    if cache_dir is not None:
        dataset_kwargs["cache_dir"] = str(Path(cache_dir).resolve())
    common: dict[str, Any] = {
        "tag": [tag],
        "dataset_path": "json",
        "dataset_kwargs": dataset_kwargs,
        "test_split": "test",
        "description": "{{system}}",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{reference}}",
        "metadata": {"version": 1.0},
    }
    generate = {
        "task": name_gen,
        **common,
        "output_type": "generate_until",
        # Only the tokenizer's eos stops decoding (lm-eval adds it); lm-eval's default stop
        # "\n\n" would cut a multi-paragraph reply.
        "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_gen_toks},
        **({"doc_to_target": "answers"} if answers else {}),
        "metric_list": [
            {
                "metric": EXACT_MATCH,
                "aggregation": "mean",
                "higher_is_better": True,
                "regexes_to_ignore": list(_STRIP_REGEXES),
            }
        ],
    }
    loglikelihood = {
        "task": name_ll,
        **common,
        "output_type": "loglikelihood",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    return generate, loglikelihood


def write_skill_tasks(
    skills: Mapping[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    prefix: str = PREFIX,
    max_gen_toks: int = 32,
    cache_dir: str | os.PathLike | None = None,
) -> SkillTasks:
    """Write each skill's documents and its two task YAML files under ``out_dir``.

    ``skills`` maps a skill name to a conversation file or folder, as for
    `fusion.evaluate.heldout.evaluate_model`. ``cache_dir`` is the ``datasets`` cache lm-eval
    loads the documents through (its default cache when None). Raises ValueError for a
    skill with no usable conversation or two skills with the same task name.
    """
    from fusion.data.conversations import UnsupportedContent, load_conversations

    if max_gen_toks < 1:
        raise InputError(f"max_gen_toks must be positive, got {max_gen_toks}", key="max_gen_toks")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{_slug(prefix)}_skills"
    written: list[SkillTask] = []
    seen: dict[str, str] = {}
    for skill, path in skills.items():
        gen, ll = (task_name(prefix, skill, kind) for kind in (GENERATE, LOGLIKELIHOOD))
        if gen in seen:
            raise InputError(f"skills {seen[gen]!r} and {skill!r} both make task {gen}", key=skill)
        seen[gen] = skill
        try:
            rows = load_conversations(
                str(path), cache_dir=None if cache_dir is None else str(cache_dir)
            )
        except StopIteration as err:  # how `datasets` fails on a zero-byte JSON file
            raise InputError(f"{path}: no usable conversation (the file is empty)", file=str(path)) from err
        try:
            docs, skipped = skill_documents(rows)
        except UnsupportedContent as err:
            raise InputError(f"{path}: {err}", file=str(path)) from None
        if not docs:
            raise InputError(f"{path}: no usable conversation ({len(skipped)} rows left out)", file=str(path))
        stem = f"{_slug(prefix)}_{_slug(skill)}"
        data = _write_jsonl(out / f"{stem}.jsonl", docs)
        for config in task_configs(
            gen, ll, data, tag=tag, max_gen_toks=max_gen_toks, cache_dir=cache_dir,
            answers="answers" in docs[0],
        ):
            _write_yaml(out / f"{config['task']}.yaml", config)
        written.append(SkillTask(skill, gen, ll, data, len(docs), skipped))
    return SkillTasks(out, tag, tuple(written))


def _write_jsonl(path: Path, docs: Iterable[Mapping[str, str]]) -> Path:
    return write_jsonl_atomic(path, docs)


def _write_yaml(path: Path, config: Mapping[str, Any]) -> Path:
    import yaml

    text = "# Written by fusion.evaluate.lm_eval_tasks; regenerate rather than edit.\n"
    return write_text_atomic(path, text + yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True))
