"""``fusechat-merge run``: the whole FuseChat run from one recipe, stage by stage.

Stages, in order: ``logits`` (pivot and each source score the corpus) → ``align`` (each
source onto the pivot) → ``fuse`` (one target per source and seed) → ``merge`` (each merge
of the targets, per seed) → ``evaluate`` (every model on the held-out skills, then the
report). Each stage writes its outputs and a record in ``WORK/stages/`` holding a key: the
hash of its options, inputs and upstream keys. A re-run skips stages whose key still
matches, redoes those whose inputs or options changed (and everything downstream, whose
keys change with them), and resumes a stage that was interrupted (the logit, alignment
and training steps resume where they stopped; merges and evaluations are redone).
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusechat_merge import __version__
from fusechat_merge.recipe import STAGES, PipelineRecipe, fingerprint, resolve


@dataclass
class Stage:
    id: str
    group: str
    key: str
    outputs: list[Path]
    action: Callable[[bool], None]  # argument: resume
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    status: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def _file_signature(path: Path) -> Any:
    """Cheap change detector for inputs: sizes and mtimes of a file or a directory's files."""
    if not path.exists():
        return str(path)
    if path.is_file():
        st = path.stat()
        return [str(path), st.st_size, st.st_mtime_ns]
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return [str(path)] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


class Pipeline:
    """Plans the stages of a recipe in a work directory and runs them."""

    def __init__(self, recipe: PipelineRecipe, work_dir: str | Path, *, log: Callable[[str], None] = print):
        self.recipe = recipe
        self.work = Path(work_dir).absolute()
        self.log = log
        self.records = self.work / "stages"
        self.stages = self._plan()

    # -- paths -------------------------------------------------------------------------
    def model_path(self, name: str) -> Path:
        spec = next(s for s in [self.recipe.pivot, *self.recipe.sources] if s.name == name)
        return resolve(spec.model, self.work)

    def store(self, name: str) -> Path:
        return self.work / "logits" / name

    def aligned(self, source: str) -> Path:
        return self.work / "aligned" / source

    def target(self, seed: int, source: str) -> Path:
        return self.work / "targets" / f"seed-{seed}" / source

    def merged(self, seed: int, merge: str) -> Path:
        return self.work / "merges" / f"seed-{seed}" / merge

    # -- planning ----------------------------------------------------------------------
    def _plan(self) -> list[Stage]:
        r = self.recipe
        stages: list[Stage] = []
        data_sig = _file_signature(resolve(r.data.train, self.work))
        logit_keys: dict[str, str] = {}
        for spec in [r.pivot, *r.sources]:
            key = fingerprint("logits", spec.model_dump(), r.logits.model_dump(), r.data.model_dump(), data_sig,
                              _file_signature(self.model_path(spec.name)), __version__)
            logit_keys[spec.name] = key
            stages.append(Stage(f"logits/{spec.name}", "logits", key, [self.store(spec.name)],
                                self._logits_action(spec)))
        align_keys: dict[str, str] = {}
        for spec in r.sources:
            key = fingerprint("align", r.align.model_dump(), logit_keys[r.pivot.name], logit_keys[spec.name])
            align_keys[spec.name] = key
            stages.append(Stage(f"align/{spec.name}", "align", key, [self.aligned(spec.name)],
                                self._align_action(spec.name)))
        target_keys: dict[tuple[int, str], str] = {}
        for seed in r.seeds:
            for spec in r.sources:
                options = {**r.fuse.defaults, **r.fuse.per_source.get(spec.name, {}), "seed": seed}
                key = fingerprint("fuse", options, align_keys[spec.name],
                                  _file_signature(self.model_path(r.pivot.name)))
                target_keys[seed, spec.name] = key
                stages.append(Stage(f"fuse/seed-{seed}/{spec.name}", "fuse", key,
                                    [self.target(seed, spec.name)], self._fuse_action(seed, spec.name, options)))
        for seed in r.seeds:
            upstream = [target_keys[seed, s.name] for s in r.sources]
            for merge in r.merges:
                key = fingerprint("merge", merge.model_dump(), upstream)
                report = self.work / "merges" / f"seed-{seed}" / f"{merge.name}-report"
                stages.append(Stage(f"merge/seed-{seed}/{merge.name}", "merge", key,
                                    [self.merged(seed, merge.name), report],
                                    self._merge_action(seed, merge, report)))
        if r.evaluate is not None:
            eval_opts = r.evaluate.model_dump()
            skills_sig = [_file_signature(resolve(f, self.work)) for f in r.evaluate.skills.values()]
            base_key = fingerprint("evaluate", eval_opts, skills_sig,
                                   [_file_signature(self.model_path(n)) for n in r.model_names()])
            stages.append(Stage("evaluate/base", "evaluate", base_key, [self.work / "eval" / "base.json"],
                                self._eval_action(None)))
            eval_keys = [base_key]
            for seed in r.seeds:
                upstream = [target_keys[seed, s.name] for s in r.sources] + [
                    s.key for s in stages if s.id.startswith(f"merge/seed-{seed}/")]
                key = fingerprint("evaluate", eval_opts, skills_sig, upstream)
                eval_keys.append(key)
                stages.append(Stage(f"evaluate/seed-{seed}", "evaluate", key,
                                    [self.work / "eval" / f"seed-{seed}.json"], self._eval_action(seed)))
            stages.append(Stage("evaluate/report", "evaluate", fingerprint("report", eval_keys),
                                [self.work / "report"], self._report_action()))
        return stages

    # -- stage actions -----------------------------------------------------------------
    def _logits_action(self, spec) -> Callable[[bool], None]:
        def run(resume: bool) -> None:
            from fusion.logits import LogitJob, generate_logits

            o = self.recipe.logits
            job = LogitJob(model=str(self.model_path(spec.name)), data=str(resolve(self.recipe.data.train, self.work)),
                           out=str(self.store(spec.name)), backend=spec.backend, top_k=o.top_k,
                           max_length=o.max_length, template=spec.template, batch_size=o.batch_size,
                           dtype=o.dtype, device=o.device, split=self.recipe.data.split,
                           cache_dir=str(self.work / ".cache" / "datasets"))
            generate_logits(job, progress=False, log=lambda m: self.log(f"    {m}"))
        return run

    def _align_action(self, source: str) -> Callable[[bool], None]:
        def run(resume: bool) -> None:
            from fusion.align_job import AlignJob, align_stores

            o = self.recipe.align
            align_stores(AlignJob(pivot=str(self.store(self.recipe.pivot.name)), source=str(self.store(source)),
                                  out=str(self.aligned(source)), method=o.method, vocab_mode=o.vocab_mode),
                         progress=False, log=lambda m: self.log(f"    {m}"))
        return run

    def _fuse_action(self, seed: int, source: str, options: dict[str, Any]) -> Callable[[bool], None]:
        def run(resume: bool) -> None:
            from fusion.trainer import fusion_config, train_fusion

            out = self.target(seed, source)
            settings = {"disable_tqdm": True, "save_strategy": "no", **options}
            config = fusion_config(out, **settings)
            train_fusion(str(self.model_path(self.recipe.pivot.name)), [str(self.aligned(source))], out,
                         config, resume=resume)
        return run

    def _merge_action(self, seed: int, merge, report: Path) -> Callable[[bool], None]:
        def run(resume: bool) -> None:
            from fusechat_merge.merging import run_merge_checked
            from fusechat_merge.report import write_sce_report
            from fusechat_merge.stats_sink import record_stats

            pivot = str(self.model_path(self.recipe.pivot.name))
            targets = [self.target(seed, s.name) for s in self.recipe.sources]
            entry = {"parameters": dict(merge.model_parameters)} if merge.model_parameters else {}
            models = ([{"model": pivot}] if merge.base else []) + [{"model": str(t), **entry} for t in targets]
            config: dict[str, Any] = {"merge_method": merge.method, "models": models, "dtype": merge.dtype}
            if merge.base:
                config["base_model"] = pivot
            if merge.parameters:
                config["parameters"] = dict(merge.parameters)
            from mergekit.options import MergeOptions

            with record_stats.collecting() as rows:
                run_merge_checked(config, self.merged(seed, merge.name),
                                  MergeOptions(quiet=True, random_seed=seed),
                                  source_name=f"merges[{merge.name}]")
            report.mkdir(parents=True, exist_ok=True)
            if rows:  # fusechat_sce merges: coefficients per tensor and target
                write_sce_report(rows, report)
        return run

    def _eval_models(self, seed: int | None) -> list[tuple[str, str, Path]]:
        r = self.recipe
        if seed is None:
            return [(r.pivot.name, "pivot", self.model_path(r.pivot.name))] + [
                (s.name, "source", self.model_path(s.name)) for s in r.sources]
        return [(f"target:{s.name}", "target", self.target(seed, s.name)) for s in r.sources] + [
            (f"merge:{m.name}", "merge", self.merged(seed, m.name)) for m in r.merges]

    def _eval_action(self, seed: int | None) -> Callable[[bool], None]:
        def run(resume: bool) -> None:
            from fusion.evaluate import evaluate_model

            e = self.recipe.evaluate
            skills = {k: str(resolve(v, self.work)) for k, v in e.skills.items()}
            rows = []
            for name, kind, path in self._eval_models(seed):
                for score in evaluate_model(path, skills, max_length=e.max_length, exact_match=e.exact_match,
                                            max_new_tokens=e.max_new_tokens,
                                            cache_dir=str(self.work / ".cache" / "datasets")):
                    rows.append({"model": name, "kind": kind, "skill": score.skill, "loss": score.loss,
                                 "exact_match": score.exact_match})
            out = self.work / "eval" / ("base.json" if seed is None else f"seed-{seed}.json")
            _write_json(out, rows)
        return run

    def _report_action(self) -> Callable[[bool], None]:
        def run(resume: bool) -> None:
            from fusechat_merge.report import (
                aggregate_seeds,
                format_results_table,
                write_results_report,
            )

            base = json.loads((self.work / "eval" / "base.json").read_text())
            per_seed = [base + json.loads((self.work / "eval" / f"seed-{s}.json").read_text())
                        for s in self.recipe.seeds]
            results = aggregate_seeds(per_seed)
            write_results_report(results, self.work / "report", title=f"{self.recipe.name}: "
                                 f"{len(self.recipe.seeds)} seed(s)")
            self.log(format_results_table(results))
        return run

    # -- running -----------------------------------------------------------------------
    def _record(self, stage: Stage, kind: str) -> Path:
        return self.records / (stage.id.replace("/", "__") + f".{kind}.json")

    def state(self, stage: Stage) -> str:
        """``done`` (key matches, outputs present), ``resume`` (started with this key),
        ``stale`` (done or started with other inputs/options) or ``new``."""
        for kind, name in (("done", "done"), ("started", "resume")):
            path = self._record(stage, kind)
            if path.exists():
                record = json.loads(path.read_text())
                if record.get("key") != stage.key:
                    return "stale"
                if kind == "started" or all(p.exists() for p in stage.outputs):
                    return name
        return "new"

    def run(self, *, from_stage: str | None = None, only: str | None = None, dry_run: bool = False) -> list[Stage]:
        for flag, value in (("--from", from_stage), ("--only", only)):
            if value is not None and value not in STAGES:
                raise ValueError(f"{flag} must be one of {', '.join(STAGES)}, got {value!r}")
        first_forced = STAGES.index(from_stage) if from_stage else len(STAGES)
        self.records.mkdir(parents=True, exist_ok=True)
        for stage in self.stages:
            state = self.state(stage)
            forced = STAGES.index(stage.group) >= first_forced
            if only is not None and stage.group != only:
                if state != "done":
                    raise RuntimeError(f"--only {only}: stage {stage.id} is not done ({state}); run it first")
                stage.status = "skipped (up to date)"
                continue
            if state == "done" and not forced:
                stage.status = "skipped (up to date)"
                if dry_run:
                    self.log(f"  {stage.id:<34} skip: up to date")
                continue
            reason = {"new": "not run yet", "stale": "inputs or options changed", "resume": "interrupted: resume",
                      "done": "forced by --from"}[state]
            if dry_run:
                self.log(f"  {stage.id:<34} run: {reason}")
                stage.status = f"would run ({reason})"
                continue
            resume = state == "resume" and not forced
            if not resume:
                for out in stage.outputs:
                    shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
            self._record(stage, "done").unlink(missing_ok=True)
            _write_json(self._record(stage, "started"), {"key": stage.key})
            self.log(f"[{stage.id}] {reason}")
            started = time.perf_counter()
            stage.action(resume)
            stage.seconds = time.perf_counter() - started
            stage.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            stage.status = "ran"
            _write_json(self._record(stage, "done"), {"key": stage.key, "seconds": stage.seconds,
                                                      "peak_rss_mb": stage.peak_rss_mb, "version": __version__})
            self._record(stage, "started").unlink(missing_ok=True)
        if not dry_run:
            self._write_timings()
        return self.stages

    def _write_timings(self) -> None:
        rows = [{"stage": s.id, "status": s.status, "seconds": round(s.seconds, 2),
                 "peak_rss_mb": round(s.peak_rss_mb, 1)} for s in self.stages]
        _write_json(self.work / "report" / "stage_times.json", rows)
        self.log("\nstage timings (peak RSS is the process's peak so far):")
        self.log(f"  {'stage':<34}{'status':<22}{'seconds':>9}{'peak RSS MiB':>14}")
        for row in rows:
            seconds = f"{row['seconds']:.1f}" if row["status"] == "ran" else "-"
            rss = f"{row['peak_rss_mb']:.0f}" if row["status"] == "ran" else "-"
            self.log(f"  {row['stage']:<34}{row['status']:<22}{seconds:>9}{rss:>14}")
        total = sum(s.seconds for s in self.stages)
        self.log(f"  total {total:.1f}s")


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2), encoding="utf-8")
    tmp.replace(path)
