"""A stage's records in ``WORK/stages``, read one way by the runner and by ``status``.

* **Files**: a stage id maps to one file stem (``fuse/seed-0/qwen2.5`` → ``fuse__seed-0__qwen2.5``)
  and back (`stage_file`, `parse_record_name`); the ``done``, ``started``, ``failed`` and
  ``progress`` records, the lock and the log are named from it (`fusechat_merge.pipeline.layout`).
  Model and merge names are plain names without ``__`` (`fusechat_merge.pipeline_recipe`), so
  the mapping is one to one.
* **What they say** (`read_stage_records`, `run_state`): ``done`` (its done record holds its
  current key and its outputs exist), ``resume`` (started with its current key, never
  finished), ``stale`` (its records hold another key: the recipe, an input or the package
  version changed; or a record is unreadable: the stage is redone, nothing can be resumed
  from a record that says nothing; or its outputs are gone) or ``new``, with the reason in
  words (none for a stage never run). The runner decides from `run_state`, and ``status``
  refines it (a ``resume`` stage is running, interrupted or failed) without deciding again.
* **What they hold** besides the key: `started_fields` (who runs the stage, where, since
  when) and `failed_fields` (its error and log); the runner adds the done record's figures.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusechat_merge import __version__
from fusion.artifacts.records import StoreError, read_record

RECORD_KINDS = ("done", "started", "failed", "progress")
NEW = "not run yet"  # what a plan says of a stage never run (`run_state` gives it no reason)
REASONS = {"stale": "inputs or options changed", "resume": "interrupted: resume", "done": "forced by --from"}


def stage_file(stage_id: str) -> str:
    """The file stem of a stage's records, lock and log."""
    return stage_id.replace("/", "__")


def record_file(records_dir: Path, stage_id: str, kind: str) -> Path:
    """The ``kind`` record of a stage (one of `RECORD_KINDS`)."""
    return records_dir / f"{stage_file(stage_id)}.{kind}.json"


def parse_record_name(name: str) -> tuple[str, str] | None:
    """``(stage id, kind)`` of a record file's name, None for any other file."""
    for kind in RECORD_KINDS:
        suffix = f".{kind}.json"
        if name.endswith(suffix) and len(name) > len(suffix):
            return name.removesuffix(suffix).replace("__", "/"), kind
    return None


@dataclass
class StageRecords:
    """What a stage's records hold (None: no such record); ``broken``: those that exist
    but cannot be read (not JSON, not an object)."""

    done: dict[str, Any] | None = None
    started: dict[str, Any] | None = None
    failed: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    broken: list[Path] = field(default_factory=list)


def read_stage_records(records_dir: Path, stage_id: str) -> StageRecords:
    """Every record of ``stage_id``; never raises on a broken one (it is listed instead)."""
    found = StageRecords()
    for kind in RECORD_KINDS:
        path = record_file(records_dir, stage_id, kind)
        try:
            setattr(found, kind, read_record(path))
        except FileNotFoundError:
            pass
        except (StoreError, OSError):
            found.broken.append(path)
    return found


def deciding_broken(records: StageRecords) -> list[Path]:
    """The unreadable records that decide a stage's state: its done and started ones (a
    failed or progress record is advice)."""
    return [p for p in records.broken if p.name.endswith((".done.json", ".started.json"))]


def broken_reason(broken: Sequence[Path]) -> str:
    """Why a stage with unreadable records reruns (from the start: they say nothing)."""
    names = ", ".join(f"{p.parent.name}/{p.name}" for p in broken)
    return f"its record {names} is unreadable"


def stale_reason(record: dict[str, Any]) -> str:
    """Why a record of another key is stale, in words: the package version when it differs."""
    made = record.get("version")
    if made and made != __version__:
        return f"made by fusechat-merge {made}, this is {__version__}"
    return REASONS["stale"]


def run_state(records: StageRecords, key: str | None, outputs: Sequence[Path]) -> tuple[str, str]:
    """``(state, reason)``: ``done``, ``resume``, ``stale`` or ``new`` (see the module doc);
    ``done`` and ``new`` give no reason (``""``). ``key`` None: the key the records hold counts as current
    (``status`` without the recipe)."""
    broken = deciding_broken(records)
    if broken:
        return "stale", broken_reason(broken)
    gone: list[Path] = []
    for record, state in ((records.done, "done"), (records.started, "resume")):
        if record is None:
            continue
        if key is not None and record.get("key") != key:
            return "stale", stale_reason(record)
        gone = [p for p in outputs if not p.exists()] if state == "done" else []
        if not gone:
            return state, REASONS["resume"] if state == "resume" else ""
    if gone:
        return "stale", f"its output {gone[0]} is gone"
    return "new", ""


def current(record: dict[str, Any] | None, key: str | None) -> bool:
    """Whether ``record`` exists and holds ``key`` (None: any key counts, as in `run_state`)."""
    return record is not None and (key is None or record.get("key") == key)


def started_fields(executor: str, key: str) -> dict[str, Any]:
    """A started record: the stage's key, who runs it, where, since when, with which version
    of this package."""
    return {"key": key, "executor": executor, "host": socket.gethostname(), "pid": os.getpid(),
            "started_at": time.time(), "version": __version__}


def failed_fields(key: str, error: str, log: Path) -> dict[str, Any]:
    """A failed record: the stage's key, its error in words, its log, where and when."""
    return {"key": key, "error": error, "log": str(log), "host": socket.gethostname(), "pid": os.getpid(),
            "failed_at": time.time()}
