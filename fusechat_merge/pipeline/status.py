"""``fusechat-merge status``: where a run stands, from its records alone (nothing runs).

The state is the runner's (`fusechat_merge.pipeline.stage_records.run_state`, decided once
for both), told in more detail: ``done``; a stage the runner would resume is ``failed`` (a
failed record with its current key), ``running`` (its process is alive, or on another
host: a Ray worker, a SLURM task) or ``interrupted`` (started here, its process gone: a
rerun resumes it); ``stale`` (its records hold another key: the recipe, an input or the
package version changed since; its done or started record cannot be read; or its outputs
are gone: a run redoes it) or ``waiting`` (never run, or run by a plan whose stages are
gone). A stage retried after its Ray worker or node was lost says which attempt it is and
where the lost ones ran.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any

from fusechat_merge.pipeline.stage_records import (
    REASONS,
    current,
    parse_record_name,
    read_stage_records,
    run_state,
)
from fusion.artifacts.locks import process_alive
from fusion.errors import InputError
from fusion.runtime.progress import format_bytes_mb, format_seconds

if TYPE_CHECKING:
    from pathlib import Path

    from fusechat_merge.pipeline.layout import WorkDir
    from fusechat_merge.pipeline.runner import Runner

STATES = ("done", "running", "interrupted", "failed", "stale", "waiting")


def stage_status(runner: Runner) -> list[dict[str, Any]]:
    """One row per stage of the runner's plan: id, state and what the records say."""
    rows: list[dict[str, Any]] = []
    states: dict[str, str] = {}
    for stage in runner.stages:
        row = _status(runner.layout, stage.id, stage.key, stage.outputs)
        row["kind"] = stage.kind
        if row["state"] == "waiting":
            row["waits_for"] = [u for u in stage.after if states.get(u) != "done"]
        states[stage.id] = row["state"]
        rows.append(row)
    return rows


class NotAWorkDirError(InputError):
    """``status`` without a recipe, of a folder no run wrote records into."""


def recorded_status(layout: WorkDir) -> list[dict[str, Any]]:
    """Without the recipe: one row per stage that left records, their keys taken as current
    (so nothing is ``stale`` or ``waiting``, but a record that cannot be read is). A folder
    without ``stages/`` is no work dir (`NotAWorkDirError`: an empty table would say nothing)."""
    if not layout.records.is_dir():
        raise NotAWorkDirError(f"{layout.root} is not a work dir of `fusechat-merge run`: it has no "
                          f"{layout.records.name}/ folder of stage records; give the folder a run's "
                          "--work-dir named (with the recipe, status also shows the stages still waiting)",
                          file=str(layout.root))
    named = (parse_record_name(path.name) for path in layout.records.glob("*.json"))
    ids = sorted({found[0] for found in named if found is not None})
    return [_status(layout, stage_id, None, []) for stage_id in ids]


def _status(layout: WorkDir, stage_id: str, key: str | None, outputs: list[Path]) -> dict[str, Any]:
    records = read_stage_records(layout.records, stage_id)
    done, started, failed = records.done, records.started, records.failed
    row: dict[str, Any] = {"id": stage_id, "log": str(layout.log(stage_id))}
    state, reason = run_state(records, key, outputs)
    if state == "done":
        row.update(state="done", host=done.get("host"), started_at=done.get("started_at"),
                   finished_at=done.get("finished_at"), seconds=done.get("seconds"),
                   peak_rss_mb=done.get("peak_rss_mb"), peak_gpu_mb=done.get("peak_gpu_mb"),
                   attempts=done.get("attempts") or [])
    elif state == "resume" and current(failed, key):
        row.update(state="failed", host=failed.get("host"), error=failed.get("error"),
                   started_at=started.get("started_at"), finished_at=failed.get("failed_at"))
    elif state == "resume":
        here = started.get("host") == socket.gethostname()
        alive = not here or process_alive(started.get("pid"))
        row.update(state="running" if alive else "interrupted", host=started.get("host"),
                   pid=started.get("pid"), started_at=started.get("started_at"), progress=records.progress,
                   attempts=[*(started.get("lost_attempts") or []),
                             {k: started.get(k) for k in ("host", "pid", "started_at")}])
    elif state == "stale":
        row.update(state="stale", reason=reason)
    else:
        row.update(state="waiting")
    return row


def format_status(rows: list[dict[str, Any]], now: float | None = None) -> list[str]:
    """The status table: one line per stage, then the count per state."""
    now = time.time() if now is None else now
    width = max([20, *(len(r["id"]) for r in rows)]) + 2
    lines = [f"{'stage':<{width}}{'state':<13}details"]
    for row in rows:
        lines.append(f"{row['id']:<{width}}{row['state']:<13}{_details(row, now)}".rstrip())
    counts = {state: sum(r["state"] == state for r in rows) for state in STATES}
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items() if n))
    return lines


def _details(row: dict[str, Any], now: float) -> str:
    state = row["state"]
    if state == "done":
        def mb(key: str) -> str:
            return format_bytes_mb(row[key]) if _number(row.get(key)) else "?"

        gpu = f", GPU {mb('peak_gpu_mb')}" if _number(row.get("peak_gpu_mb")) else ""
        seconds = format_seconds(row["seconds"]) if _number(row.get("seconds")) else "?"
        return (f"{seconds}, peak {mb('peak_rss_mb')}{gpu}, {_when(row.get('finished_at'), now)} on "
                f"{row.get('host')}{_lost(row)}")
    if state == "failed":
        return f"{row.get('error')}; log: {row['log']}"
    if state in ("running", "interrupted"):
        since = f"on {row['host']} (pid {row['pid']}) since {_when(row['started_at'], now)}"
        since += _progress(row.get("progress"), now)
        return since + _lost(row) + ("" if state == "running" else "; a rerun resumes it")
    if state == "stale":
        reason = row.get("reason") or REASONS["stale"]
        return f"{'the recipe or an input changed since it ran' if reason == REASONS['stale'] else reason}: it reruns"
    return f"for {', '.join(row['waits_for'])}" if row.get("waits_for") else ""


def _progress(progress: dict[str, Any] | None, now: float) -> str:
    """``; 120/480 steps, loss 2.31 (3s ago)`` from a progress record; what it lacks is left
    out (a record cut or written by another version never fails ``status``)."""
    if not progress or not _number(progress.get("n")):
        return ""
    total = f"/{progress['total']:g}" if _number(progress.get("total")) and progress["total"] else ""
    unit = f" {progress['unit']}" if isinstance(progress.get("unit"), str) else ""
    rest = "".join(f", {k} {v}" for k, v in progress.items() if k not in ("n", "total", "unit", "at", "rate"))
    at = progress.get("at")
    return f"; {progress['n']:g}{total}{unit}{rest} ({_when(at if _number(at) else None, now)})"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _lost(row: dict[str, Any]) -> str:
    """``; attempt 2, lost before: on HOST (WorkerCrashedError: ...)`` when earlier attempts were lost."""
    lost = [a for a in row.get("attempts") or [] if a.get("lost")]
    if not lost:
        return ""
    return f"; attempt {len(lost) + 1}, lost before: " + "; ".join(f"on {a.get('host')} ({a['lost']})" for a in lost)


def _when(stamp: float | None, now: float) -> str:
    return "?" if not _number(stamp) else f"{format_seconds(max(0.0, now - stamp))} ago"
