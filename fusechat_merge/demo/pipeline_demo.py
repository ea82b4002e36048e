"""``fusechat-merge demo``: the whole FuseChat run of the shipped ``demo-pipeline.yaml``
(package data beside this file): a Llama-style pivot and two sources of other
architectures and tokenizers, each with a skill the pivot lacks, fused and merged, and
every model evaluated on both skills.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import yaml

DEMO_RECIPE = Path(__file__).resolve().parent / "demo-pipeline.yaml"


def prepare_demo_data(work_dir: Path, *, n_train: int = 300) -> None:
    """The fusion corpus (both skills, interleaved) and one held-out file per skill."""
    from fusechat_merge.demo.skills import SKILLS, train_heldout
    from fusion.artifacts.atomic import write_jsonl_atomic
    from fusion.lm_eval_tasks import write_skill_tasks

    data = work_dir / "data"
    if (data / "train.jsonl").exists() and (data / "lm_eval").is_dir():
        return
    train: list[dict] = []
    for skill in SKILLS:
        rows, held = train_heldout(skill, n_train)
        train.extend(rows)
        write_jsonl_atomic(data / f"heldout-{skill}.jsonl", held)
    train.sort(key=lambda row: row["id"].rsplit("-", 1)[-1].zfill(6) + row["id"])
    write_jsonl_atomic(data / "train.jsonl", train)
    # the held-out checks as lm-eval tasks: exact match of the last reply (tag fusechat_skills)
    write_skill_tasks({skill: data / f"heldout-{skill}.jsonl" for skill in SKILLS}, data / "lm_eval",
                      max_gen_toks=12, cache_dir=work_dir / ".cache" / "datasets")


def run_pipeline_demo(
    work_dir: Path,
    *,
    recipe: Path = DEMO_RECIPE,
    seeds: list[int] | None = None,
    echo: Callable[[str], None] = print,
) -> Path:
    """Build the demo's models and data (reused when present), then run the recipe."""
    from fusion.lm_eval_runner import require_lm_eval

    require_lm_eval()  # exact match is lm-eval's: say which extra to install before any work
    from fusechat_merge.demo.skills import make_demo_models
    from fusechat_merge.pipeline import run_pipeline
    from fusechat_merge.pipeline_recipe import load_pipeline_recipe

    work_dir = Path(work_dir).absolute()
    if not recipe.is_file():
        raise FileNotFoundError(f"the demo recipe {recipe} is missing (a broken install?)")
    started = time.perf_counter()
    make_demo_models(work_dir / "models", log=echo)
    prepare_demo_data(work_dir)
    setup_seconds = time.perf_counter() - started
    echo(f"models and data ready in {setup_seconds:.1f}s")
    text = recipe.read_text(encoding="utf-8")
    if seeds is not None:
        raw = yaml.safe_load(text)
        raw["seeds"] = seeds
        text = yaml.safe_dump(raw, sort_keys=False)
    local = work_dir / "demo-pipeline.yaml"
    local.write_text(text, encoding="utf-8")
    run_pipeline(load_pipeline_recipe(local, work_dir), work_dir, log=echo)
    echo(f"\nreport: {work_dir / 'report'} (results.md, results.png); "
         f"SCE coefficients: {work_dir / 'merges'}/seed-*/sce-report/sce_coefficients.png")
    echo(f"demo done in {time.perf_counter() - started:.1f}s (setup {setup_seconds:.1f}s)")
    return work_dir / "report"
