"""One job class per stage kind: what a stage does, made from its recipe section.

A job holds only paths, options and plain values (it pickles), so the local runner and
any other executor run the same object: ``job.run(resume, log)``. Heavy imports happen
inside ``run``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusechat_merge.pipeline.layout import WorkDir
from fusechat_merge.pipeline_recipe import (
    BASELINES,
    ENGINE_FIELDS,
    REPORT_FIELDS,
    MergeSpec,
    ModelSpec,
    PipelineRecipe,
)
from fusion.artifacts.atomic import write_json_atomic

Log = Callable[[str], None]


def _indented(log: Log) -> Log:
    return lambda message: log(f"    {message}")


@dataclass
class LogitsJob:
    """Score the corpus with one model (`fusion.logits.generate_logits`)."""

    job: Any  # fusion.logits.LogitJob

    @classmethod
    def from_recipe(cls, recipe: PipelineRecipe, layout: WorkDir, spec: ModelSpec) -> LogitsJob:
        from fusion.logits import LogitJob

        return cls(LogitJob(
            model=layout.model(spec.model), data=layout.data(recipe.data.train),
            out=str(layout.store(spec.name)), template=spec.template, split=recipe.data.split,
            cache_dir=str(layout.datasets_cache), **recipe.logits.model_dump(),
            **{name: getattr(spec, name) for name in ENGINE_FIELDS},
        ))

    def run(self, resume: bool, log: Log) -> None:
        from fusion.logits import generate_logits

        generate_logits(self.job, log=_indented(log))


@dataclass
class AlignJob:
    """Align one source's store onto the pivot's (`fusion.align_job.align_stores`)."""

    job: Any  # fusion.align_job.AlignJob

    @classmethod
    def from_recipe(cls, recipe: PipelineRecipe, layout: WorkDir, source: str) -> AlignJob:
        from fusion.align_job import AlignJob as Alignment

        return cls(Alignment(pivot=str(layout.store(recipe.pivot.name)), source=str(layout.store(source)),
                             out=str(layout.aligned(source)), **recipe.align.model_dump()))

    def run(self, resume: bool, log: Log) -> None:
        from fusion.align_job import align_stores

        align_stores(self.job, log=_indented(log))


@dataclass
class FuseJob:
    """Train one target: the pivot fused with aligned stores (`fusion.trainer.train_fusion`),
    in this process, or under ``accelerate launch`` when ``launch`` is set
    (`fusechat_merge.pipeline.launch`). Returns the record fields of the training run
    (``world_size``, read from the target's ``train_run.json``)."""

    pivot: str
    aligned: list[str]
    out: str
    settings: dict[str, Any]
    launch: dict[str, Any] | None = None  # a LaunchSpec's values
    log_file: str = ""  # launched: the subprocess's output
    config_file: str = ""  # launched: the training options, for `fuse --config`

    @classmethod
    def from_recipe(cls, recipe: PipelineRecipe, layout: WorkDir, seed: int, source: str) -> FuseJob:
        stage_id = fuse_stage_id(seed, source)
        spec = recipe.fuse.launch_for(source)
        launch = None if spec is None else spec.model_dump()  # accelerate_config: absolute (the loader)
        return cls(layout.model(recipe.pivot.model), [str(layout.aligned(source))],
                   str(layout.target(seed, source)), fuse_settings(recipe, seed, source), launch,
                   str(layout.log(stage_id)), str(layout.launch_config(stage_id)))

    @classmethod
    def baseline(cls, recipe: PipelineRecipe, layout: WorkDir, seed: int, name: str) -> FuseJob:
        """A baseline of one seed: ``sft`` (the pivot on the first source's aligned store, the
        same corpus and steps as a target, CLM alone) or ``multi`` (every source's aligned
        store in one training). Launched like the targets (``fuse.launch``)."""
        stage_id = baseline_stage_id(seed, name)
        stores = [recipe.sources[0].name] if name == "sft" else [s.name for s in recipe.sources]
        launch = None if recipe.fuse.launch is None else recipe.fuse.launch.model_dump()
        return cls(layout.model(recipe.pivot.model), [str(layout.aligned(s)) for s in stores],
                   str(layout.baseline(seed, name)), baseline_settings(recipe, seed, name), launch,
                   str(layout.log(stage_id)), str(layout.launch_config(stage_id)))

    def training_options(self) -> dict[str, Any]:
        """The pipeline's defaults under the recipe's options (the same in-process and launched)."""
        return {"disable_tqdm": True, "save_strategy": "no", **self.settings}

    def run(self, resume: bool, log: Log) -> dict[str, Any]:
        from fusion.trainer import read_train_run

        if self.launch is not None:
            from fusechat_merge.pipeline.launch import run_launched

            fields = run_launched(self, resume, _indented(log))
        else:
            from fusion.trainer import fusion_config, train_fusion

            config = fusion_config(self.out, **self.training_options())
            train_fusion(self.pivot, self.aligned, self.out, config, resume=resume)
            fields = {}
        return {**fields, "world_size": read_train_run(self.out).get("world_size")}


def fuse_stage_id(seed: int, source: str) -> str:
    return f"fuse/seed-{seed}/{source}"


def fuse_settings(recipe: PipelineRecipe, seed: int, source: str) -> dict[str, Any]:
    """The training options of one pair: the recipe's defaults, its per-source ones, the seed."""
    return {**recipe.fuse.defaults, **recipe.fuse.per_source.get(source, {}), "seed": seed}


def baseline_stage_id(seed: int, name: str) -> str:
    return f"baseline/seed-{seed}/{name}"


def baselines(recipe: PipelineRecipe) -> list[str]:
    """The baselines the recipe asks for (``fuse.baselines``), in report order."""
    return [name for name in BASELINES if getattr(recipe.fuse.baselines, name)]


def baseline_settings(recipe: PipelineRecipe, seed: int, name: str) -> dict[str, Any]:
    """A baseline's training options: the recipe's defaults and the seed; SFT with
    ``lm_weight`` 1 (the causal-LM loss alone)."""
    return {**recipe.fuse.defaults, "seed": seed, **({"lm_weight": 1.0} if name == "sft" else {})}


def fuse_launch(recipe: PipelineRecipe, source: str) -> dict[str, Any] | None:
    """The launcher of one pair's stages, as part of their key: the number of processes is
    part of the global batch (processes × batch × accumulation)."""
    spec = recipe.fuse.launch_for(source)
    return None if spec is None else spec.model_dump()


@dataclass
class MergeJob:
    """Merge one seed's targets with one method (`fusechat_merge.merging.run_merge_checked`)."""

    config: dict[str, Any]
    out: str
    report: str
    seed: int
    name: str

    @classmethod
    def from_recipe(cls, recipe: PipelineRecipe, layout: WorkDir, seed: int, merge: MergeSpec) -> MergeJob:
        pivot = layout.model(recipe.pivot.model)
        targets = [layout.target(seed, s.name) for s in recipe.sources]
        entry = {"parameters": dict(merge.model_parameters)} if merge.model_parameters else {}
        models = ([{"model": pivot}] if merge.base else []) + [{"model": str(t), **entry} for t in targets]
        config: dict[str, Any] = {"merge_method": merge.method, "models": models, "dtype": merge.dtype}
        if merge.base:
            config["base_model"] = pivot
        if merge.parameters:
            config["parameters"] = dict(merge.parameters)
        return cls(config, str(layout.merged(seed, merge.name)), str(layout.merge_report(seed, merge.name)),
                   seed, merge.name)

    def run(self, resume: bool, log: Log) -> None:
        from mergekit.options import MergeOptions

        from fusechat_merge.merging import run_merge_checked
        from fusechat_merge.report import write_sce_report
        from fusechat_merge.stats_sink import record_stats
        from fusion.progress import bar

        with record_stats.collecting() as rows, bar(None, "merge"):
            run_merge_checked(self.config, self.out, MergeOptions(quiet=False, random_seed=self.seed),
                              source_name=f"merges[{self.name}]")
        Path(self.report).mkdir(parents=True, exist_ok=True)
        if rows:  # fusechat_sce merges: coefficients per tensor and target
            write_sce_report(rows, self.report)


@dataclass
class EvalJob:
    """Score models on the held-out skills (`fusion.evaluate.evaluate_model`)."""

    models: list[tuple[str, str, str, str]]  # (report name, kind, path, template)
    skills: dict[str, str]
    options: Any  # fusion.options.EvalOptions
    out: str
    cache_dir: str

    @classmethod
    def from_recipe(cls, recipe: PipelineRecipe, layout: WorkDir, seed: int | None) -> EvalJob:
        from fusion.options import EvalOptions

        assert recipe.evaluate is not None
        e = recipe.evaluate
        models = eval_models(recipe, layout, seed)
        options = EvalOptions(**e.model_dump(exclude={"skills", "lm_eval", *REPORT_FIELDS}))
        return cls(models, {k: str(layout.resolve(v)) for k, v in e.skills.items()}, options,
                   str(layout.scores(seed)), str(layout.datasets_cache))

    def run(self, resume: bool, log: Log) -> None:
        from fusion.evaluate import evaluate_model
        from fusion.progress import bar

        rows: list[dict[str, Any]] = []
        if not self.skills:  # only lm-eval tasks in this recipe
            write_json_atomic(Path(self.out), rows)
            return
        with bar(len(self.models), "model") as models:
            for name, kind, path, template in self.models:
                for score in evaluate_model(path, self.skills, self.options, template=template,
                                            cache_dir=self.cache_dir):
                    rows.append({"model": name, "kind": kind, "skill": score.skill, "loss": score.loss})
                models.update()
        write_json_atomic(Path(self.out), rows)


def eval_models(recipe: PipelineRecipe, layout: WorkDir, seed: int | None) -> list[tuple[str, str, str, str]]:
    """(report name, kind, path, template) of the models scored in one evaluation group: the
    pivot and sources (``seed`` None), or one seed's targets, baselines and merges."""
    pivot_template = recipe.pivot.template
    if seed is None:
        return [(recipe.pivot.name, "pivot", layout.model(recipe.pivot.model), pivot_template)] + [
            (s.name, "source", layout.model(s.model), s.template) for s in recipe.sources]
    # targets, baselines and merges share the pivot's tokenizer and template
    return [(f"target:{s.name}", "target", str(layout.target(seed, s.name)), pivot_template)
            for s in recipe.sources] + [
        (name, name, str(layout.baseline(seed, name)), pivot_template) for name in baselines(recipe)] + [
        (f"merge:{m.name}", "merge", str(layout.merged(seed, m.name)), pivot_template) for m in recipe.merges]


def lm_eval_options(recipe: PipelineRecipe, layout: WorkDir) -> dict[str, Any]:
    """The recipe's ``evaluate.lm_eval`` mapping, its include path resolved in the work dir."""
    assert recipe.evaluate is not None and recipe.evaluate.lm_eval is not None
    options = dict(recipe.evaluate.lm_eval)
    if options.get("include_path"):
        options["include_path"] = str(layout.resolve(options["include_path"]))
    return options


@dataclass
class LmEvalJob:
    """Score one model on the recipe's lm-eval tasks (`fusion.lm_eval_runner.run_lm_eval`)."""

    model: str
    options: dict[str, Any]  # LmEvalOptions fields, include_path resolved
    out: str

    @classmethod
    def from_recipe(cls, recipe: PipelineRecipe, layout: WorkDir, model: str, out: Path) -> LmEvalJob:
        return cls(model, lm_eval_options(recipe, layout), str(out))

    def run(self, resume: bool, log: Log) -> None:
        from fusion.lm_eval_runner import LmEvalOptions, require_lm_eval, run_lm_eval, write_results
        from fusion.progress import bar

        require_lm_eval()
        with bar(None, "model"):
            write_results(run_lm_eval(self.model, LmEvalOptions.from_mapping(self.options)), Path(self.out))


@dataclass
class ReportJob:
    """Aggregate the evaluation scores over seeds into the report (table, JSON, plot)."""

    scores: list[str]  # base scores first, then one file per seed
    lm_eval: list[list[tuple[str, str, str]]]  # per group (base, seeds): (model, kind, results file)
    out: str
    title: str
    skills: list[str] = dataclasses.field(default_factory=list)  # held-out skills (the effects)
    own_skills: dict[str, str] = dataclasses.field(default_factory=dict)  # source → its skill
    pivot: str = ""  # the diagnostics ("": none)
    trained: dict[int, dict[str, str]] = dataclasses.field(default_factory=dict)  # seed → name → dir
    aligned: dict[str, str] = dataclasses.field(default_factory=dict)  # source → aligned store

    @classmethod
    def from_recipe(cls, recipe: PipelineRecipe, layout: WorkDir) -> ReportJob:
        groups: list[int | None] = [None, *recipe.seeds]
        files = [str(layout.scores(g)) for g in groups]
        with_lm_eval = recipe.evaluate is not None and recipe.evaluate.lm_eval is not None
        lm_eval = [[(name, kind, str(layout.lm_eval_scores(g, name))) for name, kind, _, _ in
                    eval_models(recipe, layout, g)] if with_lm_eval else [] for g in groups]
        e = recipe.evaluate
        skills = list(e.skills) if e is not None else []
        own = {s.name: s.name for s in recipe.sources if s.name in skills}
        own.update(e.source_skills if e is not None else {})
        diagnose = e is not None and e.diagnostics
        trained = {seed: {name: path for name, kind, path, _ in eval_models(recipe, layout, seed)
                          if kind != "merge"} for seed in recipe.seeds} if diagnose else {}
        return cls(files, lm_eval, str(layout.report), f"{recipe.name}: {len(recipe.seeds)} seed(s)",
                   skills, own, layout.model(recipe.pivot.model) if diagnose else "", trained,
                   {s.name: str(layout.aligned(s.name)) for s in recipe.sources} if diagnose else {})

    def run(self, resume: bool, log: Log) -> None:
        from fusechat_merge.report import (
            aggregate_seeds,
            compute_effects,
            format_effects,
            format_results_table,
            lm_eval_rows,
            write_results_report,
        )

        groups = []
        for scores, lm_eval in zip(self.scores, self.lm_eval, strict=True):
            rows = _read_rows(Path(scores))
            for name, kind, path in lm_eval:
                rows += lm_eval_rows(name, kind, _lm_eval_metrics(Path(path)))
            groups.append(rows)
        base, *seeds = groups
        per_seed = [base + rows for rows in seeds]
        results = aggregate_seeds(per_seed)
        effects = compute_effects(per_seed, self.own_skills, self.skills)
        diagnostics = None
        if self.pivot:
            from fusechat_merge.diagnostics import collect_diagnostics, format_diagnostics

            diagnostics = collect_diagnostics(self.pivot, self.trained, self.aligned, self.skills)
        write_results_report(results, Path(self.out), title=self.title, effects=effects, diagnostics=diagnostics)
        log(format_results_table(results))
        for text in (format_effects(effects), format_diagnostics(diagnostics) if diagnostics else ""):
            if text:
                log("")
                log(text)


def _lm_eval_metrics(path: Path) -> dict[str, dict[str, float]]:
    from fusion.lm_eval_runner import metrics_by_task

    return metrics_by_task(json.loads(path.read_text(encoding="utf-8")))


def _read_rows(path: Path) -> list[Mapping[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))
