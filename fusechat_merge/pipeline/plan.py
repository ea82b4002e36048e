"""The stage plan of a recipe: ids, kinds, keys, dependencies and jobs.

A stage's key is the hash of its options, its inputs (file signatures) and its upstream
stages' keys, so a change anywhere redoes that stage and everything downstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusechat_merge import __version__
from fusechat_merge.pipeline.jobs import (
    AlignJob,
    EvalJob,
    FuseJob,
    LmEvalJob,
    LogitsJob,
    MergeJob,
    ReportJob,
    baseline_settings,
    baseline_stage_id,
    baselines,
    eval_models,
    fuse_launch,
    fuse_settings,
    fuse_stage_id,
    lm_eval_options,
)
from fusechat_merge.pipeline.layout import WorkDir
from fusechat_merge.pipeline_recipe import REPORT_FIELDS, PipelineRecipe, fingerprint


@dataclass
class Stage:
    id: str
    kind: str  # one of pipeline_recipe.STAGES
    key: str
    after: list[str]  # ids of the stages whose outputs this one reads
    outputs: list[Path]
    job: Any  # a job of fusechat_merge.pipeline.jobs
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    status: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # the done record of this run
    resources: dict[str, Any] = field(default_factory=dict)  # what a scheduler gives it


def file_signature(path: Path) -> Any:
    """Cheap change detector for inputs: sizes and mtimes of a file or a directory's files."""
    if not path.exists():
        return str(path)
    if path.is_file():
        st = path.stat()
        return [str(path), st.st_size, st.st_mtime_ns]
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return [str(path)] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def plan_stages(recipe: PipelineRecipe, layout: WorkDir) -> list[Stage]:
    """Every stage of ``recipe`` in a valid run order."""
    r = recipe
    stages: list[Stage] = []
    data_sig = file_signature(Path(layout.data(r.data.train)))
    model_sig = {s.name: file_signature(Path(layout.model(s.model))) for s in [r.pivot, *r.sources]}

    logits: dict[str, Stage] = {}
    for spec in [r.pivot, *r.sources]:
        key = fingerprint("logits", spec.model_dump(), r.logits.model_dump(), r.data.model_dump(), data_sig,
                          model_sig[spec.name], __version__)
        logits[spec.name] = Stage(f"logits/{spec.name}", "logits", key, [], [layout.store(spec.name)],
                                  LogitsJob.from_recipe(r, layout, spec))
    stages += logits.values()

    aligned: dict[str, Stage] = {}
    for spec in r.sources:
        up = [logits[r.pivot.name], logits[spec.name]]
        key = fingerprint("align", r.align.model_dump(), *(u.key for u in up))
        aligned[spec.name] = Stage(f"align/{spec.name}", "align", key, [u.id for u in up],
                                   [layout.aligned(spec.name)], AlignJob.from_recipe(r, layout, spec.name))
    stages += aligned.values()

    targets: dict[tuple[int, str], Stage] = {}
    for seed in r.seeds:
        for spec in r.sources:
            up = aligned[spec.name]
            key = fingerprint("fuse", fuse_settings(r, seed, spec.name), up.key, model_sig[r.pivot.name],
                              *([fuse_launch(r, spec.name)] if fuse_launch(r, spec.name) else []))
            targets[seed, spec.name] = Stage(fuse_stage_id(seed, spec.name), "fuse", key, [up.id],
                                             [layout.target(seed, spec.name)],
                                             FuseJob.from_recipe(r, layout, seed, spec.name))
    stages += targets.values()

    extra: dict[tuple[int, str], Stage] = {}  # the baselines (fuse.baselines), per seed
    launch = [r.fuse.launch.model_dump()] if r.fuse.launch else []
    for seed in r.seeds:
        for name in baselines(r):
            up = [aligned[r.sources[0].name]] if name == "sft" else list(aligned.values())
            key = fingerprint("fuse", baseline_settings(r, seed, name), [u.key for u in up],
                              model_sig[r.pivot.name], *launch)
            extra[seed, name] = Stage(baseline_stage_id(seed, name), "fuse", key, [u.id for u in up],
                                      [layout.baseline(seed, name)], FuseJob.baseline(r, layout, seed, name))
    stages += extra.values()

    merges: dict[int, list[Stage]] = {}
    for seed in r.seeds:
        up = [targets[seed, s.name] for s in r.sources]
        merges[seed] = [
            Stage(f"merge/seed-{seed}/{m.name}", "merge", fingerprint("merge", m.model_dump(), [u.key for u in up]),
                  [u.id for u in up], [layout.merged(seed, m.name), layout.merge_report(seed, m.name)],
                  MergeJob.from_recipe(r, layout, seed, m))
            for m in r.merges
        ]
        stages += merges[seed]

    if r.evaluate is not None:
        # lm-eval stages have their own keys; the report's own keys redo the report alone
        eval_opts = r.evaluate.model_dump(exclude={"lm_eval", *REPORT_FIELDS})
        skills_sig = [file_signature(layout.resolve(f)) for f in r.evaluate.skills.values()]
        base = Stage("evaluate/base", "evaluate",
                     fingerprint("evaluate", eval_opts, skills_sig, [model_sig[n] for n in r.model_names()]),
                     [], [layout.scores(None)], EvalJob.from_recipe(r, layout, None))
        evals = [base]
        for seed in r.seeds:
            up = ([targets[seed, s.name] for s in r.sources] + [extra[seed, b] for b in baselines(r)]
                  + merges[seed])
            evals.append(Stage(f"evaluate/seed-{seed}", "evaluate",
                               fingerprint("evaluate", eval_opts, skills_sig, [u.key for u in up]),
                               [u.id for u in up], [layout.scores(seed)], EvalJob.from_recipe(r, layout, seed)))
        if r.evaluate.lm_eval is not None:
            evals += _lm_eval_stages(r, layout, model_sig, targets, extra, merges)
        report_job = ReportJob.from_recipe(r, layout)
        report_key = fingerprint("report", [e.key for e in evals], r.evaluate.model_dump(include=set(REPORT_FIELDS)),
                                 report_job.title)
        report = Stage("evaluate/report", "evaluate", report_key, [e.id for e in evals], [layout.report],
                       report_job)
        stages += [*evals, report]
    ids = {s.id for s in stages}
    unknown = sorted(set(r.resources.stages) - ids)
    if unknown:
        raise ValueError(f"resources.stages: no stage {', '.join(unknown)}; the stages are: "
                         f"{', '.join(s.id for s in stages)}")
    for stage in stages:
        stage.resources = r.resources.for_stage(stage.id, stage.kind)
    return stages


def _lm_eval_stages(r: PipelineRecipe, layout: WorkDir, model_sig: dict[str, Any],
                    targets: dict[tuple[int, str], Stage], extra: dict[tuple[int, str], Stage],
                    merges: dict[int, list[Stage]]) -> list[Stage]:
    """One lm-eval stage per model: a model already scored with the same settings (its key:
    the lm-eval settings and the model's own key) is not scored again."""
    from fusion.lm_eval_runner import LmEvalOptions

    settings = LmEvalOptions.from_mapping(lm_eval_options(r, layout)).settings()
    merge_names = [m.name for m in r.merges]
    out = []
    for seed in [None, *r.seeds]:
        for name, _kind, path, _template in eval_models(r, layout, seed):
            if seed is None:
                upstream, model_key = [], model_sig[name]
            else:
                kind, _, short = name.partition(":")
                if kind == "target":
                    stage = targets[seed, short]
                elif kind == "merge":
                    stage = merges[seed][merge_names.index(short)]
                else:  # a baseline: its report name is its kind
                    stage = extra[seed, name]
                upstream, model_key = [stage.id], stage.key
            result = layout.lm_eval_scores(seed, name)
            group = "base" if seed is None else f"seed-{seed}"
            out.append(Stage(f"evaluate/lm-eval/{group}/{name.replace(':', '-')}", "evaluate",
                             fingerprint("lm_eval", settings, model_key), upstream, [result],
                             LmEvalJob.from_recipe(r, layout, path, result)))
    return out
