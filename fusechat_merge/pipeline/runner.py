"""Runs a stage plan: skip what is done, redo what changed, resume what was cut.

Each stage leaves a ``started`` record while it runs (key, executor, host, pid,
started_at; its bars' last state in a ``progress`` record), a ``failed`` record if its job
raised, and a ``done`` record when it finished, in ``WORK/stages/``, and everything the
libraries print in ``WORK/logs/<stage>.log`` (`fusechat_merge.console.stage_output`). The
done record holds: its key, how it ran (``executor``: local or ray, ``host``,
``pid``; ``placement``: the resources it asked for and, on Ray, its node and GPU ids), when
(``started_at``, ``finished_at``: Unix seconds; ``seconds``), every attempt (``attempts``:
host, pid, started_at, ended_at, and ``lost``: why, for those lost with their Ray worker or
node and retried), its peak memory
(``peak_rss_mb``: of the process that ran it, or of the largest process of an accelerate
launch, ``peak_rss_of`` says which; ``peak_gpu_mb`` when it used CUDA in-process) and what
its job reports (fuse: ``world_size``, the number of training processes, as the training
run recorded it). An executor runs stages through `Runner.run_stage`, so records are the
same whichever ran them. A stage is ``done`` when its done
record holds its current key and its outputs exist; ``resume`` when it started with its
current key and never finished (the logit, alignment and training jobs resume where they
stopped; merges and evaluations are redone); ``stale`` when its records hold another key
(the reason says so when it is the package version), cannot be read, or its outputs are
gone (redone); ``new`` otherwise: `fusechat_merge.pipeline.stage_records.run_state` decides,
for the runner and ``status`` alike.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from fusechat_merge import __version__
from fusechat_merge.console import (
    Summaries,
    error_text,
    format_timings,
    peak_rss_mb,
    skipped_line,
    stage_output,
)
from fusechat_merge.pipeline.layout import WorkDir
from fusechat_merge.pipeline.placement import placement
from fusechat_merge.pipeline.plan import Stage
from fusechat_merge.pipeline.stage_records import (
    NEW,
    REASONS,
    failed_fields,
    read_stage_records,
    run_state,
    started_fields,
)
from fusechat_merge.pipeline_recipe import STAGES
from fusion.artifacts.atomic import write_json_atomic
from fusion.artifacts.locks import OutputLock
from fusion.artifacts.records import write_record
from fusion.errors import FusionError, InputError
from fusion.runtime import stopping


class StageError(FusionError, RuntimeError):
    """A stage's job raised: the stage id, the error and the stage's log (its started record
    stays: a rerun resumes it)."""

    def __init__(self, stage_id: str, error: str, log: str = "") -> None:
        self.stage_id = stage_id
        self.error = error
        self.log = log
        super().__init__(f"stage {stage_id} failed: {error}" + (f"\n  full log: {log}" if log else ""),
                         stage=stage_id)


class RunRefused(FusionError, RuntimeError):  # noqa: N818 - says what happened, as Stopped does
    """A run or a stage refused before it started: what it waits for is not done, or a
    model it reads cannot be had here."""


class RunError(FusionError, RuntimeError):
    """Stages failed (and the stages waiting for them did not run)."""

    def __init__(self, failed: list[StageError], blocked: list[str]) -> None:
        self.failed = failed
        self.blocked = blocked
        lines = [str(f) for f in failed]
        if blocked:
            lines.append(f"not run (an upstream stage failed): {', '.join(blocked)}")
        super().__init__("\n".join(lines))


Work = list[tuple[Stage, bool, str]]  # (stage, resume, reason: "" for a first run) of each stage to run


class Executor(Protocol):
    def __call__(self, runner: Runner, work: Work) -> None: ...


class Runner:
    """Runs ``stages`` (a plan) in the work dir ``layout``: one after the other here, or
    through an ``executor`` (`fusechat_merge.pipeline.ray_executor.RayExecutor`)."""

    def __init__(self, stages: list[Stage], layout: WorkDir, *, log: Callable[[str], None] = print,
                 executor: str = "local", verbose: bool = False, unavailable: dict[str, str] | None = None):
        self.stages = stages
        self.unavailable = unavailable or {}  # hub ids that cannot be had here (id → why)
        self.layout = layout
        self.log = log
        self.executor = executor  # the name written into the records
        self.verbose = verbose  # the libraries' output on the terminal too, not only in the stage logs
        self._summaries: Summaries | None = None  # a local run folds the lines of short stages
        self.memory_problems: list[str] = []  # stages that cannot fit their GPUs (`pipeline.memory_plan`)

    def state(self, stage: Stage) -> str:
        """``done``, ``resume``, ``stale`` or ``new`` (see the module docstring)."""
        return self.assess(stage)[0]

    def assess(self, stage: Stage) -> tuple[str, str]:
        """The stage's state and why, in words (`fusechat_merge.pipeline.stage_records.run_state`)."""
        return run_state(read_stage_records(self.layout.records, stage.id), stage.key, stage.outputs)

    def todo(self, *, from_stage: str | None = None, only: str | None = None) -> Work:
        """The stages to run, in plan order, with (resume, reason); the others are marked
        skipped."""
        for flag, value in (("--from", from_stage), ("--only", only)):
            if value is not None and value not in STAGES:
                raise InputError(f"{flag} must be one of {', '.join(STAGES)}, got {value!r}", key=flag)
        first_forced = STAGES.index(from_stage) if from_stage else len(STAGES)
        work: Work = []
        for stage in self.stages:
            state, reason = self.assess(stage)
            forced = STAGES.index(stage.kind) >= first_forced
            if only is not None and stage.kind != only:
                if state != "done":
                    raise RunRefused(f"--only {only}: stage {stage.id} is not done ({state}); run it first",
                                     stage=stage.id)
                stage.status = "skipped (up to date)"
                continue
            if state == "done" and not forced:
                stage.status = "skipped (up to date)"
                continue
            work.append((stage, state == "resume" and not forced, REASONS["done"] if state == "done" else reason))
        return work

    def run(self, *, from_stage: str | None = None, only: str | None = None, dry_run: bool = False,
            executor: Executor | None = None) -> list[Stage]:
        """Run what `todo` chooses; one run per work dir at a time (another is refused at
        once, naming the process that holds the work dir)."""
        if dry_run:
            return self._dry_run(self.todo(from_stage=from_stage, only=only))
        with self._lock(shared=False):
            work = self.todo(from_stage=from_stage, only=only)
            self._refuse_unavailable([stage for stage, _, _ in work])
            return self._run(work, executor)

    def _refuse_unavailable(self, stages: list[Stage]) -> None:
        """Before any stage starts: refuse if one to run reads a model that cannot be had."""
        missing = {ref: why for stage in stages for ref in stage.job.reads() if (why := self.unavailable.get(ref))}
        if missing:
            users = {ref: [s.id for s in stages if ref in s.job.reads()] for ref in missing}
            raise RunRefused("models that cannot be had here, so no stage was started:\n" + "\n".join(
                f"  - {why} (needed by {', '.join(users[ref])})" for ref, why in missing.items()),
                model=next(iter(missing)))

    def _lock(self, *, shared: bool) -> OutputLock:
        return OutputLock(self.layout.run_lock, f"work dir {self.layout.root}", shared=shared)

    def _dry_run(self, work: Work) -> list[Stage]:
        chosen = {stage.id: reason for stage, _, reason in work}
        width = self._id_width()
        for stage in self.stages:
            why = chosen[stage.id] or NEW if stage.id in chosen else ""
            if stage.id in chosen:
                stage.status = f"would run ({why})"
            memory = f"  [{_memory_line(stage.memory)}]" if stage.memory else ""
            self.log(f"  {stage.id:<{width}} " + (f"run: {why}" if stage.id in chosen else "skip: up to date")
                     + memory)
        return self.stages

    def _run(self, work: Work, executor: Executor | None) -> list[Stage]:
        skipped = [s for s in self.stages if s.status.startswith("skipped")]
        if skipped:
            self.log(skipped_line(skipped))
        try:
            if executor is None:
                self._summaries = Summaries(self.log)
                for stage, resume, reason in work:
                    stopping.check()  # asked to stop while the last stage ended: before the next
                    self.run_stage(stage, resume=resume, reason=reason)
            else:
                executor(self, work)
        finally:
            if self._summaries is not None:
                self._summaries.flush()
                self._summaries = None
            self._write_timings()
        return self.stages

    def run_one(self, stage_id: str) -> Stage:
        """Run the stage ``stage_id`` alone (``run --stage``): refused unless every stage it
        waits for is done; skipped when it is done itself. Several stages may run so at once
        (a scheduler's jobs), never beside a whole run of the same work dir."""
        by_id = {s.id: s for s in self.stages}
        if stage_id not in by_id:
            raise InputError(f"no stage {stage_id!r}; the stages are: {', '.join(by_id)}", stage=stage_id)
        stage = by_id[stage_id]
        with self._lock(shared=True):
            missing = [u for u in stage.after if self.state(by_id[u]) != "done"]
            if missing:
                raise RunRefused(f"stage {stage_id} waits for {', '.join(missing)}: not done yet", stage=stage_id)
            state, reason = self.assess(stage)
            if state == "done":
                stage.status = "skipped (up to date)"
                self.log(f"[{stage_id}] up to date")
                return stage
            self._refuse_unavailable([stage])
            self.run_stage(stage, resume=state == "resume", reason=reason)
        return stage

    def plan(self) -> list[dict[str, Any]]:
        """The plan as plain data (``run --plan``): id, kind, after, status, resources."""
        return [{"id": s.id, "kind": s.kind, "after": list(s.after), "status": self.state(s),
                 "resources": dict(s.resources), "outputs": [str(p) for p in s.outputs],
                 **({"memory": s.memory} if s.memory else {})}
                for s in self.stages]

    def run_stage(self, stage: Stage, *, resume: bool, reason: str,
                  attempts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Run one stage's job between its ``started`` and ``done`` records; returns the
        done record. A job that raises becomes `StageError` (the started record stays); one stopped by a
        signal (`fusion.runtime.stopping.Stopped`) names the stage and keeps its started record too.
        The stage's lock is held meanwhile: a stage another process runs is refused."""
        try:
            with OutputLock(self.layout.stage_lock(stage.id), f"stage {stage.id}"):
                return self._run_stage(stage, resume=resume, reason=reason, attempts=attempts or [])
        except stopping.Stopped as stop:  # its started record stays: the rerun resumes it
            stop.stage = stop.stage or stage.id
            stage.status = "stopped"
            raise

    def _run_stage(self, stage: Stage, *, resume: bool, reason: str, attempts: list[dict[str, Any]]) -> dict[str, Any]:
        if not resume:
            for out in stage.outputs:
                shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        for kind in ("done", "failed", "progress"):
            self.layout.record(stage.id, kind).unlink(missing_ok=True)
        started_record = started_fields(self.executor, stage.key)
        if attempts:  # the earlier attempts of this run, lost with their worker (the Ray executor)
            started_record.update(attempt=len(attempts) + 1, lost_attempts=attempts)
        write_record(self.layout.record(stage.id, "started"), started_record)
        _reset_peak_gpu()
        started_at, started = time.time(), time.perf_counter()
        log = self.layout.log(stage.id)
        try:
            with stage_output(stage.id, log, self.layout.record(stage.id, "progress"), verbose=self.verbose) as output:
                reported = stage.job.run(resume, output.log) or {}
        except Exception as err:  # its started record stays: a rerun resumes
            error = error_text(stage, err)
            write_record(self.layout.record(stage.id, "failed"), failed_fields(stage.key, error, log))
            raise StageError(stage.id, error, str(log)) from err
        seconds = time.perf_counter() - started
        record: dict[str, Any] = {
            "key": stage.key, "executor": self.executor, "host": socket.gethostname(), "pid": os.getpid(),
            "started_at": started_at, "finished_at": time.time(), "seconds": seconds,
            "peak_rss_mb": peak_rss_mb(),
            "peak_rss_of": "process", **_peak_gpu(), "version": __version__,
            "placement": placement(stage.resources),
            "attempts": [*attempts, {"host": socket.gethostname(), "pid": os.getpid(), "started_at": started_at,
                                     "ended_at": time.time()}]}
        if "peak_rss_mb" in reported:
            record["peak_rss_of"] = "largest launched process"
        record.update(reported)
        write_record(self.layout.record(stage.id, "done"), record)
        self.layout.record(stage.id, "started").unlink(missing_ok=True)
        self.layout.record(stage.id, "progress").unlink(missing_ok=True)
        apply_record(stage, record)
        summaries = self._summaries or Summaries(self.log)  # alone (--stage, a Ray task): at once
        summaries.add(stage, record, reason, output.lines)
        if summaries is not self._summaries:
            summaries.flush()
        return record

    def _id_width(self) -> int:
        return max([34, *(len(s.id) for s in self.stages)])

    def _write_timings(self) -> None:
        rows = [{"stage": s.id, "status": s.status, "seconds": round(s.seconds, 2),
                 "peak_rss_mb": round(s.peak_rss_mb, 1)} for s in self.stages]
        write_json_atomic(self.layout.report / "stage_times.json", rows)
        self.log("")
        for line in format_timings(rows):
            self.log(line)


def _memory_line(memory: dict[str, Any]) -> str:
    """``"memory 13.49 GiB/device × 1"`` (and ``"does not fit"``) for a dry-run line."""
    fits = "" if memory.get("fits", True) else ", DOES NOT FIT"
    return f"memory {memory['per_device_gib']:.2f} GiB/device × {memory['devices']}{fits}"


def apply_record(stage: Stage, record: dict[str, Any]) -> None:
    """Copy a done record's figures onto the (driver's) stage."""
    stage.seconds = record["seconds"]
    stage.peak_rss_mb = record["peak_rss_mb"]
    stage.status = "ran"
    stage.info = record


def _cuda():  # torch's CUDA when this process already uses it (never imports torch)
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None


def _reset_peak_gpu() -> None:
    cuda = _cuda()
    for i in range(cuda.device_count() if cuda else 0):
        cuda.reset_peak_memory_stats(i)


def _peak_gpu() -> dict[str, float]:
    cuda = _cuda()
    if cuda is None:
        return {}
    return {"peak_gpu_mb": max(cuda.max_memory_allocated(i) for i in range(cuda.device_count())) / 2**20}
