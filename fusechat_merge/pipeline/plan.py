"""The stage plan of a recipe: which job, under which id; the rest follows from the jobs.

`plan_stages` is wiring only: it makes one job per stage from the recipe (`jobs`). A stage's
dependencies are the stages that write what its job reads, and its key is computed from the
job (`keys.stage_key`): a change to any field, to the content of any input, or to an
upstream stage redoes that stage and everything downstream, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusechat_merge.pipeline.jobs import (
    AlignJob,
    CombineLogitsJob,
    EvalJob,
    FuseJob,
    Job,
    LmEvalJob,
    LogitsJob,
    MergeJob,
    ReportJob,
    baseline_stage_id,
    baselines,
    eval_models,
    fuse_stage_id,
    logit_parts,
    trusted_models,
)
from fusechat_merge.pipeline.keys import stage_key
from fusechat_merge.pipeline.layout import WorkDir
from fusechat_merge.pipeline_recipe import PipelineRecipe, ResourceSpec
from fusion.artifacts.provenance import path_fingerprint
from fusion.errors import InputError


@dataclass
class Stage:
    id: str
    kind: str  # one of pipeline_recipe.STAGES
    key: str
    after: list[str]  # ids of the stages whose outputs this one reads
    outputs: list[Path]
    job: Any  # a `jobs.Job`
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    status: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # the done record of this run
    resources: dict[str, Any] = field(default_factory=dict)  # what a scheduler gives it
    memory: dict[str, Any] | None = None  # estimated memory per device (`memory.check_memory`)


class Planner:
    """Adds stages in run order, each after the stages that write what it reads."""

    def __init__(self, layout: WorkDir, stages: list[Stage] | None = None) -> None:
        self.layout = layout
        self.stages: list[Stage] = list(stages or [])
        self._fingerprints: dict[str, str] = {}  # one read of each input per plan

    def add(self, stage_id: str, job: Job) -> Stage:
        key, after = self.key(job)
        stage = Stage(stage_id, job.kind, key, after, job.writes(), job)
        self.stages.append(stage)
        return stage

    def key(self, job: Job) -> tuple[str, list[str]]:
        """The key of ``job`` and the ids of the stages it waits for."""
        inputs, after = [], []
        for path in job.reads():
            writer = self._writer(Path(path))
            if writer is None:
                if path not in self._fingerprints:
                    self._fingerprints[path] = path_fingerprint(path)
                inputs.append((path, self._fingerprints[path]))
            else:
                inputs.append((path, writer.key))
                if writer.id not in after:
                    after.append(writer.id)
        return stage_key(job, inputs, self.layout.root), after

    def _writer(self, path: Path) -> Stage | None:
        for stage in self.stages:
            if any(path == out or out in path.parents for out in stage.outputs):
                return stage
        return None


def plan_stages(recipe: PipelineRecipe, layout: WorkDir) -> list[Stage]:
    """Every stage of ``recipe`` in a valid run order."""
    r = recipe
    plan = Planner(layout)
    for spec in [r.pivot, *r.sources]:
        count = logit_parts(r, spec)
        if count == 1:
            plan.add(f"logits/{spec.name}", LogitsJob.from_recipe(r, layout, spec))
            continue
        for i in range(count):
            stage_id = f"logits/{spec.name}/part-{i}"
            threads = max(1, int(r.resources.for_stage(stage_id, "logits")["num_cpus"]))
            plan.add(stage_id, LogitsJob.from_recipe(r, layout, spec, (i, count), threads))
        plan.add(f"logits/{spec.name}", CombineLogitsJob.from_recipe(layout, spec, count))
    for spec in r.sources:
        plan.add(f"align/{spec.name}", AlignJob.from_recipe(r, layout, spec.name))
    for seed in r.seeds:
        for spec in r.sources:
            plan.add(fuse_stage_id(seed, spec.name), FuseJob.from_recipe(r, layout, seed, spec.name))
    for seed in r.seeds:
        for name in baselines(r):
            plan.add(baseline_stage_id(seed, name), FuseJob.baseline(r, layout, seed, name))
    for seed in r.seeds:
        for m in r.merges:
            plan.add(f"merge/seed-{seed}/{m.name}", MergeJob.from_recipe(r, layout, seed, m))
    if r.evaluate is not None:
        for skill in r.evaluate.skills:  # the held-out files the transfer measure reads
            for spec in [r.pivot, *r.sources]:
                plan.add(f"logits/eval-{skill}/{spec.name}", LogitsJob.for_skill(r, layout, spec, skill))
            for spec in r.sources:
                plan.add(f"align/eval-{skill}/{spec.name}", AlignJob.for_skill(r, layout, spec.name, skill))
        groups: list[int | None] = [None, *r.seeds]
        for seed in groups:
            plan.add("evaluate/base" if seed is None else f"evaluate/seed-{seed}",
                     EvalJob.from_recipe(r, layout, seed))
        if r.evaluate.lm_eval is not None:
            trusted = trusted_models(r, layout)
            for seed in groups:
                group = "base" if seed is None else f"seed-{seed}"
                for name, _kind, path, _template in eval_models(r, layout, seed):
                    trust = path in trusted or (seed is not None and r.pivot.trust_remote_code)
                    plan.add(f"evaluate/lm-eval/{group}/{name.replace(':', '-')}",
                             LmEvalJob.from_recipe(r, layout, path, layout.lm_eval_scores(seed, name), trust))
        plan.add("evaluate/report", ReportJob.from_recipe(r, layout))
    stages = plan.stages
    ids = {s.id for s in stages}
    unknown = sorted(set(r.resources.stages) - ids)
    if unknown:
        raise InputError(f"resources.stages: no stage {', '.join(unknown)}; the stages are: "
                         f"{', '.join(s.id for s in stages)}", key="resources.stages")
    for stage in stages:
        stage.resources = r.resources.for_stage(stage.id, stage.kind)
        if isinstance(stage.job, LogitsJob) and stage.job.backend == "vllm":  # its tensor-parallel GPUs
            stage.resources["num_gpus"] = max(stage.resources["num_gpus"], stage.job.tensor_parallel_size)
        if isinstance(stage.job, CombineLogitsJob):  # links files: one CPU, unless its own entry says more
            stage.resources = {**ResourceSpec().model_dump(), **(r.resources.stages[stage.id].model_dump(
                exclude_unset=True) if stage.id in r.resources.stages else {})}
    return stages
