"""Runs a stage plan: skip what is done, redo what changed, resume what was cut.

Each stage leaves a ``started`` record while it runs and a ``done`` record (its key, time
and peak memory) when it finished, in ``WORK/stages/``. A stage is ``done`` when its done
record holds its current key and its outputs exist; ``resume`` when it started with its
current key and never finished (the logit, alignment and training jobs resume where they
stopped; merges and evaluations are redone); ``stale`` when its records hold another key;
``new`` otherwise.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections.abc import Callable

from fusechat_merge import __version__
from fusechat_merge.pipeline.layout import WorkDir
from fusechat_merge.pipeline.plan import Stage
from fusechat_merge.pipeline_recipe import STAGES
from fusion.artifacts.atomic import write_json_atomic

_REASONS = {"new": "not run yet", "stale": "inputs or options changed", "resume": "interrupted: resume",
            "done": "forced by --from"}


class Runner:
    """Runs ``stages`` (a plan) in the work dir ``layout``, one after the other."""

    def __init__(self, stages: list[Stage], layout: WorkDir, *, log: Callable[[str], None] = print):
        self.stages = stages
        self.layout = layout
        self.log = log

    def state(self, stage: Stage) -> str:
        """``done``, ``resume``, ``stale`` or ``new`` (see the module docstring)."""
        for kind, name in (("done", "done"), ("started", "resume")):
            path = self.layout.record(stage.id, kind)
            if path.exists():
                record = json.loads(path.read_text(encoding="utf-8"))
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
        self.layout.records.mkdir(parents=True, exist_ok=True)
        for stage in self.stages:
            state = self.state(stage)
            forced = STAGES.index(stage.kind) >= first_forced
            if only is not None and stage.kind != only:
                if state != "done":
                    raise RuntimeError(f"--only {only}: stage {stage.id} is not done ({state}); run it first")
                stage.status = "skipped (up to date)"
                continue
            if state == "done" and not forced:
                stage.status = "skipped (up to date)"
                if dry_run:
                    self.log(f"  {stage.id:<34} skip: up to date")
                continue
            reason = _REASONS[state]
            if dry_run:
                self.log(f"  {stage.id:<34} run: {reason}")
                stage.status = f"would run ({reason})"
                continue
            self.run_stage(stage, resume=state == "resume" and not forced, reason=reason)
        if not dry_run:
            self._write_timings()
        return self.stages

    def run_stage(self, stage: Stage, *, resume: bool, reason: str) -> None:
        """Run one stage's job between its ``started`` and ``done`` records."""
        if not resume:
            for out in stage.outputs:
                shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        self.layout.record(stage.id, "done").unlink(missing_ok=True)
        write_json_atomic(self.layout.record(stage.id, "started"), {"key": stage.key})
        self.log(f"[{stage.id}] {reason}")
        started = time.perf_counter()
        stage.job.run(resume, self.log)
        stage.seconds = time.perf_counter() - started
        stage.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        stage.status = "ran"
        write_json_atomic(self.layout.record(stage.id, "done"), {
            "key": stage.key, "seconds": stage.seconds, "peak_rss_mb": stage.peak_rss_mb,
            "version": __version__})
        self.layout.record(stage.id, "started").unlink(missing_ok=True)

    def _write_timings(self) -> None:
        rows = [{"stage": s.id, "status": s.status, "seconds": round(s.seconds, 2),
                 "peak_rss_mb": round(s.peak_rss_mb, 1)} for s in self.stages]
        write_json_atomic(self.layout.report / "stage_times.json", rows)
        self.log("\nstage timings (peak RSS is the process's peak so far):")
        self.log(f"  {'stage':<34}{'status':<22}{'seconds':>9}{'peak RSS MiB':>14}")
        for row in rows:
            seconds = f"{row['seconds']:.1f}" if row["status"] == "ran" else "-"
            rss = f"{row['peak_rss_mb']:.0f}" if row["status"] == "ran" else "-"
            self.log(f"  {row['stage']:<34}{row['status']:<22}{seconds:>9}{rss:>14}")
        self.log(f"  total {sum(s.seconds for s in self.stages):.1f}s")
