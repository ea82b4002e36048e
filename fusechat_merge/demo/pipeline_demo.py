"""``fusechat-merge demo``: the whole FuseChat run of the shipped ``demo-pipeline.yaml``
(package data beside this file): a Llama-style pivot and three sources of other
architectures and tokenizers, each expert in a skill the pivot knows only weakly (or, for
pick, not at all), fused by light continual training and merged, with the paper's SFT and
Multi baselines, and every model evaluated on every skill.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import yaml

DEMO_RECIPE = Path(__file__).resolve().parent / "demo-pipeline.yaml"


# The fusion corpus: some plain chat, 1000 conversations of arithmetic and of reversal
# (chosen on the validation split over 500 and 1000; the sources have seen most of these
# prompts) and few of pick, each showing one of its right replies (FuseChat's regime: a
# corpus small against what the sources know): 100, chosen on the validation split over 300
# by target:pick − SFT in mass on right first tokens (benchmarks/sweep_pick.py).
CORPUS_ROWS: dict[str, int] = {"generic": 300, "arithmetic": 1000, "reversal": 1000, "pick": 100}
# The stream each skill's corpus rows come from: the sources' own (seed 0: they have seen
# these conversations), except pick's, whose source has not: its distribution there is what
# it generalises over the set, not the one reply it was shown.
CORPUS_STREAMS: dict[str, int] = {"arithmetic": 0, "reversal": 0, "pick": 3}
SPLITS = ("heldout", "validation")


def prepare_demo_data(work_dir: Path, *, corpus_rows: dict[str, int] | None = None) -> None:
    """The fusion corpus (the skills and chat, shuffled), and per skill a held-out file
    (the reported numbers) and a validation file (for choosing settings), disjoint from
    each other and from the corpus, each also written as lm-eval tasks."""
    import random

    from fusechat_merge.demo.skills import (
        SKILLS,
        prompts,
        skill_conversations,
        train_heldout,
        training_rows,
        validation_rows,
    )
    from fusion.artifacts.atomic import write_jsonl_atomic
    from fusion.evaluate.lm_eval_tasks import write_skill_tasks

    data = work_dir / "data"
    if (data / "train.jsonl").exists() and all((data / _task_dir(s)).is_dir() for s in SPLITS):
        return
    counts = {**CORPUS_ROWS, **(corpus_rows or {})}
    train = skill_conversations("generic", counts["generic"], seed=1)
    for skill in SKILLS:
        held, valid = train_heldout(skill, 0)[1], validation_rows(skill)
        train += training_rows(skill, counts[skill], CORPUS_STREAMS[skill], prompts(held) | prompts(valid))
        write_jsonl_atomic(data / f"heldout-{skill}.jsonl", held)
        write_jsonl_atomic(data / f"validation-{skill}.jsonl", valid)
    random.Random(1).shuffle(train)
    write_jsonl_atomic(data / "train.jsonl", train)
    # the checks as lm-eval tasks: exact match of the last reply (tag fusechat_skills)
    for split in SPLITS:
        write_skill_tasks({skill: data / f"{split}-{skill}.jsonl" for skill in SKILLS}, data / _task_dir(split),
                          max_gen_toks=12, cache_dir=work_dir / ".cache" / "datasets")


def _task_dir(split: str) -> str:
    return "lm_eval" if split == "heldout" else f"lm_eval_{split}"


def _evaluate_on(raw: dict, split: str) -> dict:
    """The recipe with its evaluation pointed at ``split``'s files and tasks."""
    from fusechat_merge.demo.skills import SKILLS

    raw["evaluate"]["skills"] = {skill: f"data/{split}-{skill}.jsonl" for skill in SKILLS}
    raw["evaluate"]["lm_eval"]["include_path"] = f"data/{_task_dir(split)}"
    return raw


def run_pipeline_demo(
    work_dir: Path,
    *,
    recipe: Path = DEMO_RECIPE,
    seeds: list[int] | None = None,
    split: str = "heldout",
    echo: Callable[[str], None] = print,
    verbose: bool = False,
) -> Path:
    """Build the demo's models and data (reused when present), then run the recipe,
    evaluated on the held-out prompts or, with ``split="validation"``, on the validation
    prompts that the recipe's settings were chosen on. The libraries' output goes to
    ``work_dir/logs/`` (``setup.log``, one log per stage), live too when ``verbose``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    from fusion.evaluate.lm_eval_runner import require_lm_eval

    require_lm_eval()  # exact match is lm-eval's: say which extra to install before any work
    work_dir = Path(work_dir).absolute()
    if not recipe.is_file():
        raise FileNotFoundError(f"the demo recipe {recipe} is missing (a broken install?)")
    from fusechat_merge.pipeline import WorkDir
    from fusion.artifacts.locks import OutputLock

    # the run's lock, before the models are made: a second demo in this folder is refused
    # at once, naming this one (not after minutes of work, and never writing the same models)
    with OutputLock(WorkDir(work_dir).run_lock, f"work dir {work_dir}"):
        return _run_demo(work_dir, recipe, seeds, split, echo, verbose)


def _run_demo(work_dir: Path, recipe: Path, seeds: list[int] | None, split: str,
              echo: Callable[[str], None], verbose: bool) -> Path:
    from fusechat_merge.demo.skills import make_demo_models, torch_threads
    from fusechat_merge.pipeline import run_pipeline
    from fusechat_merge.pipeline_recipe import load_pipeline_recipe
    from fusechat_merge.recipe_keys import read_recipe_file
    from fusion.runtime.log_capture import captured
    from fusion.runtime.log_capture import echo as to_terminal

    started = time.perf_counter()
    with captured(work_dir / "logs" / "setup.log", label="setup", verbose=verbose):
        make_demo_models(work_dir / "models", log=to_terminal)
        prepare_demo_data(work_dir)
    setup_seconds = time.perf_counter() - started
    echo(f"models and data ready in {setup_seconds:.1f}s")
    raw, text = read_recipe_file(recipe)
    if seeds is not None or split != "heldout":
        if seeds is not None:
            raw["seeds"] = seeds
        if split != "heldout":
            raw = _evaluate_on(raw, split)
        text = yaml.safe_dump(raw, sort_keys=False)
    local = work_dir / "demo-pipeline.yaml"
    local.write_text(text, encoding="utf-8")
    # one torch thread for the whole run: the toy's matmuls are too small to share, and on a
    # 2-core machine that other work shares, a second spinning OpenMP thread made a training
    # step 7-11x slower (20 ms against 150-270 ms)
    with torch_threads(1):
        run_pipeline(load_pipeline_recipe(local, work_dir), work_dir, log=echo, verbose=verbose)
    echo(f"\nreport: {work_dir / 'report'} (results.md, results.png); "
         f"SCE coefficients: {work_dir / 'merges'}/seed-*/sce-report/sce_coefficients.png")
    echo(f"demo done in {time.perf_counter() - started:.1f}s (setup {setup_seconds:.1f}s)")
    return work_dir / "report"
