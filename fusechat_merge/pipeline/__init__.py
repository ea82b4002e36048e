"""``fusechat-merge run``: the whole FuseChat run from one recipe, stage by stage.

Stages, in order: ``logits`` (pivot and each source score the corpus) → ``align`` (each
source onto the pivot) → ``fuse`` (one target per source and seed) → ``merge`` (each merge
of the targets, per seed) → ``evaluate`` (every model on the held-out skills, then the
report). In parts:

* `layout.WorkDir`: every path of a run, in one place;
* `jobs`: one job class per stage kind, made from its recipe section; a job holds only
  paths and options (it pickles), so any executor can run it;
* `plan.plan_stages`: the stages with their ids, keys (hash of options, inputs and
  upstream keys), dependencies and jobs;
* `runner.Runner`: the state machine (skip what is done, redo what changed, resume what
  was cut) over the records in ``WORK/stages/``, and the timing table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fusechat_merge.pipeline.layout import WorkDir
from fusechat_merge.pipeline.plan import Stage, plan_stages
from fusechat_merge.pipeline.runner import Runner
from fusechat_merge.pipeline_recipe import PipelineRecipe

__all__ = ["Runner", "Stage", "WorkDir", "plan_stages", "run_pipeline"]


def run_pipeline(
    recipe: PipelineRecipe,
    work_dir: str | Path,
    *,
    log: Callable[[str], None] = print,
    from_stage: str | None = None,
    only: str | None = None,
    dry_run: bool = False,
) -> list[Stage]:
    """Plan ``recipe`` in ``work_dir`` and run it; returns the stages with their status."""
    layout = WorkDir(Path(work_dir).absolute())
    runner = Runner(plan_stages(recipe, layout), layout, log=log)
    return runner.run(from_stage=from_stage, only=only, dry_run=dry_run)
