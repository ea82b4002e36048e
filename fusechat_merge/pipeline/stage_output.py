"""How a stage looks from outside while and after it runs: its log, its progress, its
summary line, its failed record, the timing table.

`stage_output` wraps one ``job.run``: the libraries' output goes to ``WORK/logs/<stage>.log``
(`fusion.runtime.progress.captured`), the job's bars report to ``WORK/stages/<stage>.progress.json``,
the job's own lines are kept for the terminal (printed under the summary line), and a job
that raises leaves its traceback in the log and a ``failed`` record beside the ``started``
one. The started record holds where and since when the stage runs (`started_fields`).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fusechat_merge import __version__
from fusechat_merge.pipeline.stage_records import NEW
from fusion.artifacts.records import StoreError, write_record
from fusion.runtime.progress import captured, format_bytes_mb, format_seconds
from fusion.runtime.stopping import Stopped

if TYPE_CHECKING:
    from fusechat_merge.pipeline.layout import WorkDir
    from fusechat_merge.pipeline.plan import Stage


def started_fields(executor: str) -> dict[str, Any]:
    """What a started record says besides the key: who runs the stage, where, since when,
    with which version of this package."""
    return {"executor": executor, "host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time(),
            "version": __version__}


@dataclass
class StageLines:
    """The job's own lines of one stage run (shown under its summary line)."""

    lines: list[str] = field(default_factory=list)

    def log(self, message: str) -> None:
        print(message, flush=True)  # into the stage's log
        self.lines.extend(message.splitlines() or [""])


@contextmanager
def stage_output(stage: Stage, layout: WorkDir, *, verbose: bool = False) -> Iterator[StageLines]:
    """Run the block as stage ``stage``'s job (see the module docstring)."""
    failed = layout.record(stage.id, "failed")
    progress = layout.record(stage.id, "progress")
    failed.unlink(missing_ok=True)
    progress.unlink(missing_ok=True)
    lines = StageLines()
    with captured(layout.log(stage.id), label=stage.id, verbose=verbose, progress_file=progress):
        print(f"==> [{stage.id}] {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}", flush=True)
        try:
            yield lines
        except Stopped as stop:  # not a failure: the rerun resumes
            print(f"==> [{stage.id}] {stop}; a rerun resumes it", flush=True)
            raise
        except Exception as err:
            traceback.print_exc()  # into the log
            write_record(failed, {"key": stage.key, "error": error_text(stage, err),
                                       "log": str(layout.log(stage.id)), "host": socket.gethostname(),
                                       "pid": os.getpid(), "failed_at": time.time()})
            raise


def error_text(stage: Stage, err: BaseException) -> str:
    """A stage's error as a run says it. An output its job refuses to resume gets the run's
    way forward: ``run`` has no ``--overwrite``, ``--resume`` or ``--out`` (the stage's own
    command's remedies); removing the stage's output starts the stage over."""
    if isinstance(err, StoreError) and err.remedy:
        outputs = " and ".join(str(p) for p in stage.outputs)
        return (f"{type(err).__name__}: {err.reason}; to start stage {stage.id} over, remove {outputs} and "
                f"rerun (or rerun with --from {stage.kind}: every {stage.kind} stage and those after it)")
    return f"{type(err).__name__}: {err}"


FOLD_SECONDS = 60.0  # a stage shorter than this, with no lines of its own, shares its family's line


class Summaries:
    """The summary lines of a run: a stage that took `FOLD_SECONDS` or more, or said
    something, gets its own line at once; shorter ones are folded into one line per family
    (``merge/seed-0``: ``sce 2.1s, linear 1.9s``), printed when another family starts or
    the run ends, so that a run of many small stages stays a screen long."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.family = ""
        self.folded: list[tuple[Stage, dict[str, Any], str]] = []

    def add(self, stage: Stage, record: dict[str, Any], reason: str, lines: Sequence[str]) -> None:
        family = stage.id.rpartition("/")[0] or stage.id
        if family != self.family:
            self.flush()
        if lines or record["seconds"] >= FOLD_SECONDS:
            self.flush()
            self.log(summary_line(stage, record, reason))
            for line in lines:
                self.log(line)
            return
        self.family = family
        self.folded.append((stage, record, reason))

    def flush(self) -> None:
        if len(self.folded) == 1:
            self.log(summary_line(*self.folded[0]))
        elif self.folded:
            parts = ", ".join(f"{stage.id.rpartition('/')[2]} {format_seconds(record['seconds'])}"
                              for stage, record, _ in self.folded)
            peak = format_bytes_mb(max(record["peak_rss_mb"] for _, record, _ in self.folded))
            self.log(f"[{self.family}/] ran: {parts} (peak {peak})")
        self.folded = []
        self.family = ""


def summary_line(stage: Stage, record: dict[str, Any], reason: str) -> str:
    """``[id] ran in 12.3s, peak 812 MiB (interrupted: resume)``; a stage's first run says no
    reason."""
    peak = format_bytes_mb(record["peak_rss_mb"])
    gpu = f", GPU {format_bytes_mb(record['peak_gpu_mb'])}" if record.get("peak_gpu_mb") else ""
    why = f" ({reason})" if reason and reason != NEW else ""
    return f"[{stage.id}] ran in {format_seconds(record['seconds'])}, peak {peak}{gpu}{why}"


def skipped_line(stages: Sequence[Stage]) -> str:
    """One line for the stages skipped as up to date: how many, of which groups."""
    counts: dict[str, int] = {}
    for stage in stages:
        counts[stage_group(stage.id)] = counts.get(stage_group(stage.id), 0) + 1
    groups = ", ".join(f"{n} {group}" for group, n in counts.items())
    return f"up to date, skipped: {len(stages)} stage{'s' * (len(stages) != 1)} ({groups})"


def stage_group(stage_id: str) -> str:
    """The stages' group in the timing table: the id without its seed and model parts
    (``fuse/seed-0/qwen`` → ``fuse``, ``evaluate/lm-eval/base/pivot`` → ``evaluate/lm-eval``)."""
    parts = stage_id.split("/")
    kept = [p for p in parts[:-1] if not p.startswith("seed-") and p != "base"]
    return "/".join(kept) or parts[0]


def format_timings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The timing table, one row per group of stages (each stage's own line is its summary
    line; all of them are in ``report/stage_times.json``)."""
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        group = groups.setdefault(stage_group(row["stage"]),
                                  {"ran": 0, "skipped": 0, "not run": 0, "seconds": 0.0, "peak": 0.0})
        ran = row["status"] == "ran"
        group["ran" if ran else "skipped" if row["status"].startswith("skipped") else "not run"] += 1
        if ran:
            group["seconds"] += row["seconds"]
            group["peak"] = max(group["peak"], row["peak_rss_mb"])
    width = max([20, *(len(g) for g in groups)]) + 2
    lines = ["stage timings (peak RSS of the process that ran the stage; per stage: report/stage_times.json):",
             f"  {'stages':<{width}}{'ran':>5}{'skipped':>9}{'not run':>9}{'seconds':>10}{'peak RSS':>12}"]
    for name, g in groups.items():
        seconds = f"{g['seconds']:.1f}" if g["ran"] else "-"
        peak = format_bytes_mb(g["peak"]) if g["ran"] else "-"
        lines.append(f"  {name:<{width}}{g['ran']:>5}{g['skipped']:>9}{g['not run']:>9}{seconds:>10}{peak:>12}")
    lines.append(f"  total {sum(g['seconds'] for g in groups.values()):.1f}s")
    return lines
