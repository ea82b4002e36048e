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
* `stage_records`: a stage id's record files (both ways) and the state they say, decided
  once for `runner` and `status`;
* `runner.Runner`: the state machine (skip what is done, redo what changed, resume what
  was cut) over the records in ``WORK/stages/``, and the timing table; it runs the stages
  one after the other in this process (the ``local`` executor), one alone (``--stage``),
  or hands them to an executor (what it prints: `fusechat_merge.console`);
* `status`: ``fusechat-merge status``, the runner's state of every stage told in detail;
* `launch`: a fuse stage under ``accelerate launch`` (the recipe's ``fuse.launch``);
* `ray_executor.RayExecutor`: the stages as Ray tasks, every ready stage at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fusechat_merge.pipeline.layout import WorkDir
from fusechat_merge.pipeline.plan import Stage, plan_stages
from fusechat_merge.pipeline.runner import Runner
from fusechat_merge.pipeline_recipe import EXECUTORS, PipelineRecipe
from fusion.errors import InputError

__all__ = ["EXECUTORS", "MemoryFitError", "Runner", "Stage", "WorkDir", "memory_plan", "pipeline_runner",
           "plan_stages", "run_pipeline"]


def run_pipeline(
    recipe: PipelineRecipe,
    work_dir: str | Path,
    *,
    log: Callable[[str], None] = print,
    from_stage: str | None = None,
    only: str | None = None,
    dry_run: bool = False,
    executor: str = "local",
    ray_address: str | None = None,
    verbose: bool = False,
    retries: int | None = None,
) -> list[Stage]:
    """Plan ``recipe`` in ``work_dir`` and run it; returns the stages with their status.
    ``executor``: ``local`` (this process, stage after stage) or ``ray`` (a Ray cluster at
    ``ray_address``, or a local Ray instance). ``verbose``: the libraries' output on the
    terminal too (it always goes to ``WORK/logs/<stage>.log``). ``retries``: how often a Ray
    stage lost with its worker or node is submitted again (default: the recipe's ``retries``)."""
    if executor not in EXECUTORS:
        raise InputError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}", key="executor")
    from fusechat_merge.pipeline_recipe import unavailable_models

    layout = WorkDir(Path(work_dir).absolute())
    runner = Runner(plan_stages(recipe, layout), layout, log=log, executor=executor, verbose=verbose,
                    unavailable=unavailable_models(recipe, layout.root))
    problems = memory_plan(recipe, runner.stages)
    if problems and not dry_run:
        raise MemoryFitError(problems)
    run_with = None
    if executor == "ray":
        from fusechat_merge.pipeline.ray_executor import RayExecutor

        run_with = RayExecutor(ray_address, retries=recipe.retries if retries is None else retries)
    stages = runner.run(from_stage=from_stage, only=only, dry_run=dry_run, executor=run_with)
    if problems:  # a dry run shows the plan, then says what does not fit
        raise MemoryFitError(problems)
    return stages


class MemoryFitError(InputError):
    """Stages whose estimated memory per GPU exceeds the GPUs' (what to change is in each line)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("the recipe does not fit its GPUs (estimated before any stage ran):\n"
                         + "\n".join(f"  - {p}" for p in problems))


def memory_plan(recipe: PipelineRecipe, stages: list[Stage]) -> list[str]:
    """Put each stage's memory estimate on it (``Stage.memory``, shown by ``--plan`` and
    ``--dry-run``) and return the stages that cannot fit the GPUs (`memory.check_memory`)."""
    from fusechat_merge.pipeline.memory import check_memory

    estimates, problems = check_memory(stages, recipe.logits.max_length, recipe.resources.gpu_memory)
    failing = {p.split()[1] for p in problems}  # "stage ID needs ..."
    for stage in stages:
        if stage.id in estimates:
            stage.memory = {**estimates[stage.id].as_dict(), "fits": stage.id not in failing}
    return problems


def pipeline_runner(recipe: PipelineRecipe, work_dir: str | Path, *,
                    log: Callable[[str], None] = print, verbose: bool = False,
                    memory: bool = False, unavailable: dict[str, str] | None = None) -> Runner:
    """The runner of ``recipe`` in ``work_dir`` (for ``--plan``, ``--stage`` and ``status``);
    ``memory``: refuse a plan with a stage that cannot fit its GPUs (`MemoryFitError`), after
    putting every stage's estimate on it; ``unavailable``: hub ids it refuses to run stages
    with (`pipeline_recipe.unavailable_models`)."""
    layout = WorkDir(Path(work_dir).absolute())
    runner = Runner(plan_stages(recipe, layout), layout, log=log, verbose=verbose, unavailable=unavailable)
    if memory:
        runner.memory_problems = memory_plan(recipe, runner.stages)
    return runner
