"""One job class per stage kind: what a stage does, made from its recipe section.

A job is a frozen dataclass of paths, options and plain values (it pickles), so the local
runner and any other executor run the same object: ``job.run(resume, log)``. It declares
what it reads (`Job.reads`: model directories, data, skill files, upstream outputs) and
what it writes (`Job.writes`); the stage key is computed from the job itself
(`fusechat_merge.pipeline.keys`), so every field is in the key without anyone listing it.
Heavy imports happen inside ``run``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

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
from fusion.options import LogitJob, StoreAlignment

Log = Callable[[str], None]


def _indented(log: Log) -> Log:
    return lambda message: log(f"    {message}")


class Job:
    """What every job declares: its stage kind, the paths it reads and those it writes."""

    kind: ClassVar[str]  # one of pipeline_recipe.STAGES

    def reads(self) -> list[str]:
        """Every path (or hub id) whose content decides the output."""
        raise NotImplementedError

    def writes(self) -> list[Path]:
        raise NotImplementedError

    def run(self, resume: bool, log: Log) -> dict[str, Any] | None:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class LogitsJob(LogitJob, Job):
    """Score the corpus, or one part of it, with one model (`fusion.capture.logit_job.generate_logits`):
    a `fusion.capture.logit_job.LogitJob` (model, data, out and the scoring options) that runs as a stage."""

    kind: ClassVar[str] = "logits"
    threads: int | None = None  # CPU threads (a part's, from its resources: parts share machines)

    @classmethod
    def from_recipe(cls, recipe: PipelineRecipe, layout: WorkDir, spec: ModelSpec,
                    part: tuple[int, int] | None = None, threads: int | None = None) -> LogitsJob:
        """The model's whole corpus, or part ``(i, N)`` of it (``--shard i/N``) into its part store."""
        out = layout.store(spec.name) if part is None else layout.store_part(spec.name, part[0])
        return cls(model=layout.model(spec.model), data=layout.data(recipe.data.train), out=str(out),
                   template=spec.template, split=recipe.data.split, cache_dir=str(layout.datasets_cache),
                   **({} if part is None else {"shard": f"{part[0]}/{part[1]}"}), **recipe.logits.options(),
                   **{name: getattr(spec, name) for name in ENGINE_FIELDS}, threads=threads)

    @classmethod
    def for_skill(cls, recipe: PipelineRecipe, layout: WorkDir, spec: ModelSpec, skill: str) -> LogitsJob:
        """The model's store of one held-out skill file (``evaluate.skills``), scored with the
        corpus's options, for the transfer measure (a local file: its split is ``train``)."""
        assert recipe.evaluate is not None
        return cls(model=layout.model(spec.model), data=str(layout.resolve(recipe.evaluate.skills[skill])),
                   out=str(layout.eval_store(skill, spec.name)), template=spec.template, split="train",
                   cache_dir=str(layout.datasets_cache), **recipe.logits.options(),
                   **{name: getattr(spec, name) for name in ENGINE_FIELDS})

    def reads(self) -> list[str]:
        return [self.model, self.data]

    def writes(self) -> list[Path]:
        return [Path(self.out)]

    def run(self, resume: bool, log: Log) -> dict[str, Any]:
        """Scores the corpus; reports the scoring throughput (tokens/s, padding share, ...)."""
        import torch

        from fusion.artifacts.logit_store import LogitStore
        from fusion.capture.logit_job import generate_logits

        before = torch.get_num_threads()
        torch.set_num_threads(self.threads or before)
        try:
            generate_logits(self, log=_indented(log))
        finally:
            torch.set_num_threads(before)
        return {"scoring": LogitStore(self.out).scoring}


def logit_parts(recipe: PipelineRecipe, spec: ModelSpec) -> int:
    """How many parts a model's scoring is split into (its own ``parts``, else ``logits.parts``)."""
    return spec.parts if spec.parts is not None else recipe.logits.parts


@dataclass(frozen=True)
class CombineLogitsJob(Job):
    """Combine a model's part stores into the store an unsplit run makes
    (`fusion.artifacts.logit_store.merge_stores`, as ``logits-merge``)."""

    kind: ClassVar[str] = "logits"
    parts: list[str]
    out: str

    @classmethod
    def from_recipe(cls, layout: WorkDir, spec: ModelSpec, count: int) -> CombineLogitsJob:
        return cls([str(layout.store_part(spec.name, i)) for i in range(count)], str(layout.store(spec.name)))

    def reads(self) -> list[str]:
        return list(self.parts)

    def writes(self) -> list[Path]:
        return [Path(self.out)]

    def run(self, resume: bool, log: Log) -> None:
        from fusion.artifacts.logit_store import merge_stores

        manifest = merge_stores(self.parts, self.out)
        _indented(log)(f"combined {len(self.parts)} parts: {manifest.sequences} sequences, "
                       f"{manifest.tokens:,} tokens")


@dataclass(frozen=True, kw_only=True)
class AlignJob(StoreAlignment, Job):
    """Align one source's store onto the pivot's (`fusion.align.job.align_stores`): a
    `fusion.align.job.StoreAlignment` (pivot, source, out and the alignment options) that
    runs as a stage."""

    kind: ClassVar[str] = "align"
    vocab_map_from: str = ""  # a corpus's aligned store whose vocabulary map this alignment reuses

    @classmethod
    def from_recipe(cls, recipe: PipelineRecipe, layout: WorkDir, source: str) -> AlignJob:
        spec = next(s for s in recipe.sources if s.name == source)
        # the tokenizers from where the models are now, not from where the stores say they were
        return cls(pivot=str(layout.store(recipe.pivot.name)), source=str(layout.store(source)),
                   out=str(layout.aligned(source)), pivot_model=layout.model(recipe.pivot.model),
                   source_model=layout.model(spec.model), **recipe.align.model_dump(),
                   trust_remote_code=recipe.pivot.trust_remote_code or spec.trust_remote_code)

    @classmethod
    def for_skill(cls, recipe: PipelineRecipe, layout: WorkDir, source: str, skill: str) -> AlignJob:
        """``source``'s store of a held-out skill file aligned to the pivot's, with the
        corpus's alignment options and the vocabulary map its alignment built (or was given),
        so the skill's positions get the same source → pivot ids as training did."""
        spec = next(s for s in recipe.sources if s.name == source)
        return cls(pivot=str(layout.eval_store(skill, recipe.pivot.name)),
                   source=str(layout.eval_store(skill, source)),
                   out=str(layout.eval_aligned(skill, source)), pivot_model=layout.model(recipe.pivot.model),
                   source_model=layout.model(spec.model), **recipe.align.model_dump(),
                   trust_remote_code=recipe.pivot.trust_remote_code or spec.trust_remote_code,
                   vocab_map_from=str(layout.aligned(source)))

    def reads(self) -> list[str]:
        return [p for p in (self.pivot, self.source, self.vocab_map, self.vocab_map_from) if p]

    def writes(self) -> list[Path]:
        return [Path(self.out)]

    def run(self, resume: bool, log: Log) -> None:
        from fusion.align.job import align_stores
        from fusion.artifacts.vocab_map_file import FILE_NAME as VOCAB_MAP_FILE_NAME

        job = self
        corpus_map = Path(self.vocab_map_from) / VOCAB_MAP_FILE_NAME if self.vocab_map_from else None
        if corpus_map is not None and not job.vocab_map and corpus_map.is_file():
            job = dataclasses.replace(job, vocab_map=str(corpus_map))  # absent: the same tokenizer
        align_stores(job, log=_indented(log))


@dataclass(frozen=True)
class FuseJob(Job):
    """Train one target: the pivot fused with aligned stores (`fusion.train.trainer.train_fusion`),
    in this process, or under ``accelerate launch`` when ``launch`` is set
    (`fusechat_merge.pipeline.launch`). Returns the record fields of the training run
    (``world_size``, read from the target's ``train_run.json``)."""

    kind: ClassVar[str] = "fuse"
    pivot: str
    aligned: list[str]
    out: str
    settings: dict[str, Any]  # FusionConfig fields: the recipe's defaults, per-source ones, the seed
    launch: dict[str, Any] | None = None  # a LaunchSpec's values (processes × batch: the global batch)
    log_file: str = ""  # launched: the subprocess's output
    config_file: str = ""  # launched: the training options, for `fuse --config`

    @classmethod
    def from_recipe(cls, recipe: PipelineRecipe, layout: WorkDir, seed: int, source: str) -> FuseJob:
        """The pair (``seed``, ``source``): the recipe's defaults, its per-source options, the seed."""
        settings = {**recipe.fuse.defaults, **recipe.fuse.per_source.get(source, {}), "seed": seed,
                    **_pivot_trust(recipe)}
        return cls._made(recipe, layout, fuse_stage_id(seed, source), [source], layout.target(seed, source),
                         settings, recipe.fuse.launch_for(source))

    @classmethod
    def baseline(cls, recipe: PipelineRecipe, layout: WorkDir, seed: int, name: str) -> FuseJob:
        """A baseline of one seed: ``sft`` (the pivot on the first source's aligned store, the
        same corpus and steps as a target, CLM alone: ``lm_weight`` 1) or ``multi`` (every
        source's aligned store in one training). Launched like the targets (``fuse.launch``)."""
        stores = [recipe.sources[0].name] if name == "sft" else [s.name for s in recipe.sources]
        settings = {**recipe.fuse.defaults, "seed": seed, **({"lm_weight": 1.0} if name == "sft" else {}),
                    **_pivot_trust(recipe)}
        return cls._made(recipe, layout, baseline_stage_id(seed, name), stores, layout.baseline(seed, name),
                         settings, recipe.fuse.launch)

    @classmethod
    def _made(cls, recipe: PipelineRecipe, layout: WorkDir, stage_id: str, stores: list[str], out: Path,
              settings: dict[str, Any], launch: Any) -> FuseJob:
        return cls(layout.model(recipe.pivot.model), [str(layout.aligned(s)) for s in stores], str(out),
                   settings, None if launch is None else launch.model_dump(),
                   str(layout.log(stage_id)), str(layout.launch_config(stage_id)))

    def reads(self) -> list[str]:
        config = (self.launch or {}).get("accelerate_config")
        return [self.pivot, *self.aligned, *([config] if config else [])]

    def writes(self) -> list[Path]:
        return [Path(self.out)]

    def training_options(self) -> dict[str, Any]:
        """The pipeline's defaults under the recipe's options (the same in-process and launched)."""
        return {"disable_tqdm": True, "save_strategy": "no", **self.settings}

    def run(self, resume: bool, log: Log) -> dict[str, Any]:
        from fusion.train.output import read_train_run

        if self.launch is not None:
            from fusechat_merge.pipeline.launch import run_launched

            fields = run_launched(self, resume, _indented(log))
        else:
            from fusion.train.config import fusion_config
            from fusion.train.trainer import train_fusion

            config = fusion_config(self.out, **self.training_options())
            train_fusion(self.pivot, self.aligned, self.out, config, resume=resume)
            fields = {}
        return {**fields, "world_size": read_train_run(self.out).get("world_size")}


def _pivot_trust(recipe: PipelineRecipe) -> dict[str, Any]:
    """The pivot's ``trust_remote_code`` as a training option (absent when off: the keys of
    runs without remote code stay as they were)."""
    return {"trust_remote_code": True} if recipe.pivot.trust_remote_code else {}


def trusted_models(recipe: PipelineRecipe, layout: WorkDir) -> list[str]:
    """The model paths whose own code the recipe allows (``trust_remote_code`` on their entry)."""
    return [layout.model(s.model) for s in [recipe.pivot, *recipe.sources] if s.trust_remote_code]


def fuse_stage_id(seed: int, source: str) -> str:
    return f"fuse/seed-{seed}/{source}"


def baseline_stage_id(seed: int, name: str) -> str:
    return f"baseline/seed-{seed}/{name}"


def baselines(recipe: PipelineRecipe) -> list[str]:
    """The baselines the recipe asks for (``fuse.baselines``), in report order."""
    return [name for name in BASELINES if getattr(recipe.fuse.baselines, name)]


@dataclass(frozen=True)
class MergeJob(Job):
    """Merge one seed's targets with one method (`fusechat_merge.merging.run_merge_checked`)."""

    kind: ClassVar[str] = "merge"
    config: dict[str, Any]  # the mergekit recipe
    out: str
    report: str
    seed: int
    name: str
    trust_remote_code: bool = False  # the pivot's (targets and merge share its architecture)

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
                   seed, merge.name, recipe.pivot.trust_remote_code)

    def reads(self) -> list[str]:
        return list(dict.fromkeys([m["model"] for m in self.config["models"]] +
                                  ([self.config["base_model"]] if "base_model" in self.config else [])))

    def writes(self) -> list[Path]:
        return [Path(self.out), Path(self.report)]

    def run(self, resume: bool, log: Log) -> None:
        from mergekit.options import MergeOptions

        from fusechat_merge.merging import run_merge_checked
        from fusechat_merge.report.sce import write_sce_report
        from fusechat_merge.stats_sink import record_stats
        from fusion.runtime.progress import bar

        with record_stats.collecting() as rows, bar(None, "merge"):
            run_merge_checked(self.config, self.out, MergeOptions(quiet=False, random_seed=self.seed,
                                                                   trust_remote_code=self.trust_remote_code),
                              source_name=f"merges[{self.name}]", overwrite=True)  # the stage key decides
        Path(self.report).mkdir(parents=True, exist_ok=True)
        if rows:  # fusechat_sce merges: coefficients per tensor and target
            write_sce_report(rows, self.report)


@dataclass(frozen=True)
class EvalJob(Job):
    """Score models on the held-out skills (`fusion.evaluate.heldout.evaluate_model`)."""

    kind: ClassVar[str] = "evaluate"
    models: list[tuple[str, str, str, str]]  # (report name, kind, path, template)
    skills: dict[str, str]
    options: Any  # fusion.options.EvalOptions
    out: str
    cache_dir: str
    trusted: list[str] = dataclasses.field(default_factory=list)  # paths whose own code may run
    # the transfer measure: skill → source → that skill file's store aligned to the pivot's
    transfer: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    temperature: float = 1.0  # the fusion targets' (fuse_temperature): the source as training saw it

    @classmethod
    def from_recipe(cls, recipe: PipelineRecipe, layout: WorkDir, seed: int | None) -> EvalJob:
        from fusion.options import EvalOptions

        assert recipe.evaluate is not None
        e = recipe.evaluate
        models = eval_models(recipe, layout, seed)
        options = EvalOptions(**e.model_dump(exclude={"skills", "lm_eval", *REPORT_FIELDS}))
        trusted = trusted_models(recipe, layout) if seed is None else \
            ([] if not recipe.pivot.trust_remote_code else [path for _, _, path, _ in models])
        transfer = {skill: {s.name: str(layout.eval_aligned(skill, s.name)) for s in recipe.sources}
                    for skill in e.skills}
        return cls(models, {k: str(layout.resolve(v)) for k, v in e.skills.items()}, options,
                   str(layout.scores(seed)), str(layout.datasets_cache), trusted, transfer,
                   float(recipe.fuse.defaults.get("fuse_temperature", 1.0)))

    def reads(self) -> list[str]:
        stores = [path for per_source in self.transfer.values() for path in per_source.values()]
        return [path for _, _, path, _ in self.models] + list(self.skills.values()) + stores

    def writes(self) -> list[Path]:
        return [Path(self.out)]

    def run(self, resume: bool, log: Log) -> None:
        """Per model and skill the held-out reply loss (and, where the rows list every right
        reply, the mass on right first answer tokens); for every model that reads the pivot's
        tokens (all but the sources) also the transfer measure per source."""
        from fusion.evaluate.heldout import (
            evaluate_skill,
            load_model,
            right_answer_mass,
            transfer_scores,
        )
        from fusion.evaluate.lm_eval_tasks import right_mass_column
        from fusion.runtime.memory_faults import memory_faults_named
        from fusion.runtime.progress import bar

        rows: list[dict[str, Any]] = []
        if not self.skills:  # only lm-eval tasks in this recipe
            write_json_atomic(Path(self.out), rows)
            return
        with bar(len(self.models), "model") as models:
            for name, kind, path, template in self.models:
                less = (f"lower batch_size (now {self.options.batch_size}) or max_length (now "
                        f"{self.options.max_length}) of the evaluation")
                with memory_faults_named(f"evaluating {path}", lambda: "no score of this group was written",
                                         lambda less=less: less):
                    model, tokenizer = load_model(path, trust_remote_code=path in self.trusted)
                    for skill, data in self.skills.items():
                        score = evaluate_skill(model, tokenizer, skill, data, self.options, template=template,
                                               cache_dir=self.cache_dir)
                        rows.append({"model": name, "kind": kind, "skill": score.skill, "loss": score.loss})
                        mass = right_answer_mass(model, tokenizer, data, template=template,
                                                 max_length=self.options.max_length, cache_dir=self.cache_dir)
                        if mass is not None:  # a skill whose rows list every right reply
                            rows.append({"model": name, "kind": kind, "skill": right_mass_column(skill), "value": mass})
                    if kind != "source":
                        for skill, stores in self.transfer.items():
                            if not stores:
                                continue
                            scores = transfer_scores(model, tokenizer, stores, temperature=self.temperature,
                                                     batch_size=self.options.batch_size)
                            rows += [{"model": name, "kind": kind, "skill": skill, "source": source,
                                      "transfer_kl": m["kl"], "transfer_cover": m["cover"],
                                      "positions": m["positions"]} for source, m in scores.items()]
                    del model
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


@dataclass(frozen=True)
class LmEvalJob(Job):
    """Score one model on the recipe's lm-eval tasks (`fusion.evaluate.lm_eval_runner.run_lm_eval`)."""

    kind: ClassVar[str] = "evaluate"
    model: str
    options: dict[str, Any]  # LmEvalOptions fields, include_path resolved
    out: str
    lm_eval_version: str | None  # a new lm-eval may score differently

    @classmethod
    def from_recipe(cls, recipe: PipelineRecipe, layout: WorkDir, model: str, out: Path,
                    trust_remote_code: bool = False) -> LmEvalJob:
        from fusion.evaluate.lm_eval_options import lm_eval_version

        assert recipe.evaluate is not None and recipe.evaluate.lm_eval is not None
        options = dict(recipe.evaluate.lm_eval)
        if trust_remote_code:
            options["trust_remote_code"] = True
        if options.get("include_path"):
            options["include_path"] = str(layout.resolve(options["include_path"]))
        return cls(model, options, str(out), lm_eval_version())

    def reads(self) -> list[str]:
        return [self.model, *([self.options["include_path"]] if self.options.get("include_path") else [])]

    def writes(self) -> list[Path]:
        return [Path(self.out)]

    def run(self, resume: bool, log: Log) -> None:
        from fusion.evaluate.lm_eval_options import LmEvalOptions
        from fusion.evaluate.lm_eval_results import write_results
        from fusion.evaluate.lm_eval_runner import require_lm_eval, run_lm_eval
        from fusion.runtime.progress import bar

        require_lm_eval()
        with bar(None, "model"):
            write_results(run_lm_eval(self.model, LmEvalOptions.from_mapping(self.options)), Path(self.out))


@dataclass(frozen=True)
class ReportJob(Job):
    """Aggregate the evaluation scores over seeds into the report (table, JSON, plot)."""

    kind: ClassVar[str] = "evaluate"
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

    def reads(self) -> list[str]:
        results = [path for group in self.lm_eval for _, _, path in group]
        trained = [path for models in self.trained.values() for path in models.values()]
        return [*self.scores, *results, *([self.pivot] if self.pivot else []), *trained, *self.aligned.values()]

    def writes(self) -> list[Path]:
        return [Path(self.out)]

    def run(self, resume: bool, log: Log) -> None:
        from fusechat_merge.report.effects import compute_effects, format_effects
        from fusechat_merge.report.results import (
            TRANSFER_NOTE,
            aggregate_seeds,
            format_results_table,
            format_transfer_table,
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
        write_results_report(results, Path(self.out), title=self.title, effects=effects, diagnostics=diagnostics,
                             own_skills=self.own_skills)
        log(format_results_table(results))
        transfer = format_transfer_table(results, self.own_skills)
        for text in (f"Transfer to the sources:\n{transfer}\n{TRANSFER_NOTE}" if transfer else "",
                     format_effects(effects), format_diagnostics(diagnostics) if diagnostics else ""):
            if text:
                log("")
                log(text)


def _lm_eval_metrics(path: Path) -> dict[str, dict[str, float]]:
    from fusion.evaluate.lm_eval_results import metrics_by_task

    return metrics_by_task(json.loads(path.read_text(encoding="utf-8")))


def _read_rows(path: Path) -> list[Mapping[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))
