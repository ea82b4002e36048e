"""The one console: what a person sees of a command or of a run's stages, while and after
they run.

* **A command** (``logits``, ``align``, ``fuse``, ``merge``, ``eval``) looks like a stage:
  `command_output` puts the libraries' output in a log (``--log``, default ``OUT.log``
  beside the command's output once it is made; live with ``-v``, `output_options`) and
  ends with one summary line.
* **A stage of a run**: `stage_output` wraps one ``job.run``: the libraries' output goes to
  ``WORK/logs/<stage>.log``, the job's bars report to its progress record, the job's own
  lines are kept to be printed under its summary line (`Summaries`: one line per stage,
  short ones folded per family); `skipped_line` and `format_timings` close a run;
  `error_text` says a stage's error as a run says it.
* **Stopping**: `stopping_cleanly` turns SIGTERM or Ctrl-C into a stop at the next safe
  point and one line (`stopped_message`).

Both kinds of block share `_logged`: a ``==>`` header line in the log, a failure's
traceback into it. What a stage's records hold is `fusechat_merge.pipeline.stage_records`';
this module only prints.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from fusion.artifacts.records import StoreError
from fusion.errors import FusionError
from fusion.runtime.log_capture import captured, echo
from fusion.runtime.progress import format_bytes_mb, format_seconds, reporting_to
from fusion.runtime.stopping import Stopped, on_signals

if TYPE_CHECKING:
    from fusechat_merge.pipeline.plan import Stage

F = TypeVar("F", bound=Callable[..., Any])


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def _logged(path: Path, *, label: str, header: str, verbose: bool, where: str = "") -> Iterator[None]:
    """The block with the libraries' output in ``path`` (its bars labelled ``label``) under a
    ``==> header TIME where`` line; a stop says so in the log, a failure leaves its traceback
    there."""
    with captured(path, label=label, verbose=verbose):
        print(f"==> {header} {time.strftime('%Y-%m-%d %H:%M:%S')}{where}", flush=True)
        try:
            yield
        except Stopped as stop:  # not a failure: a rerun resumes
            print(f"==> {header} {stop}; a rerun resumes it", flush=True)
            raise
        except Exception:
            traceback.print_exc()  # into the log
            raise


# --------------------------------------------------------------------------- a command

def output_options(command: F | None = None, *, short: bool = True) -> Any:
    """The ``-v/--verbose`` and ``--log`` options of a command (``short`` False: no ``-v``,
    for ``merge``, where it is mergekit's verbosity, which also shows the output live)."""
    def add(command: F) -> F:
        command = click.option("--log", "log_file", type=click.Path(dir_okay=False), default=None,
                               help="Where the libraries' output goes [default: OUT.log beside --out].")(command)
        return click.option(*(["-v"] if short else []), "--verbose", is_flag=True,
                            help="Show the libraries' output (bars, warnings, logs) live; it always goes "
                            "to the log.")(command)

    return add if command is None else add(command)


def default_log(out: str | Path) -> Path:
    """``OUT.log``: beside the command's output, never inside it."""
    out = Path(out).absolute()
    return out.with_name(out.name + ".log")


@contextmanager
def command_output(name: str, out: str | Path, log_file: str | None, verbose: bool) -> Iterator[None]:
    """Run the command's work with the libraries' output in its log; then one summary line
    (time, peak memory, log). A failure leaves its traceback in the log and names the log.
    Without ``log_file`` the log is written in the temporary directory and moved beside
    the output once the command succeeded: a refused command leaves nothing beside its
    inputs."""
    if log_file:
        path = Path(log_file)
    else:
        handle, temporary = tempfile.mkstemp(prefix=f"fusechat-merge-{name}-", suffix=".log")
        os.close(handle)
        path = Path(temporary)
    started = time.perf_counter()
    try:
        with _logged(path, label=name, header=name, verbose=verbose):
            yield
    except Stopped:  # what it made is kept to resume from: its log goes beside it
        if not log_file and Path(out).exists():
            shutil.move(path, default_log(out))
        raise
    except (FusionError, click.ClickException) as err:
        err.message += f"\n  full log: {path}"
        raise
    if not log_file:
        path = Path(shutil.move(path, default_log(out)))
    echo(f"{name}: done in {format_seconds(time.perf_counter() - started)}, peak {format_bytes_mb(peak_rss_mb())}; "
         f"log: {path}")


@contextmanager
def stopping_cleanly(resume: str) -> Iterator[None]:
    """Run a command's long work under `fusion.runtime.stopping.on_signals`: on SIGTERM or Ctrl-C
    it stops at its next safe point; then one line says where it stopped, what is kept and
    ``resume`` (how to go on), and the command exits with 128 + the signal number (143 for
    SIGTERM, 130 for SIGINT: a scheduler requeues it)."""
    with on_signals(notify=_notify):
        try:
            yield
        except Stopped as stop:
            click.echo(stopped_message(stop, resume), err=True)
            raise click.exceptions.Exit(stop.exit_code) from None


def stopped_message(stop: Stopped, resume: str) -> str:
    """``stopped by SIGTERM in stage S: where; resume (exit code 143)``."""
    where = f" in stage {stop.stage}" if stop.stage else ""
    said = stop.where or ("stopped at once" + (" (the stage is redone by the rerun)" if stop.stage else ""))
    return f"stopped by {stop.signal_name}{where}: {said}. {resume} (exit code {stop.exit_code})"


def _notify(message: str) -> None:
    with contextlib.suppress(Exception):  # a signal may arrive while the terminal is being written
        echo(message)


# --------------------------------------------------------------------------- a stage of a run

@dataclass
class StageLines:
    """The job's own lines of one stage run (shown under its summary line)."""

    lines: list[str] = field(default_factory=list)

    def log(self, message: str) -> None:
        print(message, flush=True)  # into the stage's log
        self.lines.extend(message.splitlines() or [""])


@contextmanager
def stage_output(stage_id: str, log: Path, progress: Path, *, verbose: bool = False) -> Iterator[StageLines]:
    """Run the block as stage ``stage_id``'s job: the libraries' output in ``log``, its bars
    reporting to ``progress``, its own lines kept (see the module docstring)."""
    lines = StageLines()
    with reporting_to(progress), _logged(log, label=stage_id, header=f"[{stage_id}]", verbose=verbose,
                                         where=f" on {socket.gethostname()}"):
        yield lines


def error_text(stage: Stage, err: BaseException) -> str:
    """A stage's error as a run says it. An output its job refuses to resume gets the run's
    way forward: ``run`` has no ``--overwrite``, ``--resume`` or ``--out`` (the stage's own
    command's remedies); removing the stage's output starts the stage over."""
    if isinstance(err, StoreError) and err.remedy:
        outputs = " and ".join(str(p) for p in stage.outputs)
        return (f"{type(err).__name__}: {err.reason}; to start stage {stage.id} over, remove {outputs} and "
                f"rerun (or rerun with --from {stage.kind}: every {stage.kind} stage and those after it)")
    return f"{type(err).__name__}: {err}"


def reason_note(reason: str) -> str:
    """`` (why)`` after a stage's line; nothing for a stage's first run (it has no reason)."""
    return f" ({reason})" if reason else ""


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
    return f"[{stage.id}] ran in {format_seconds(record['seconds'])}, peak {peak}{gpu}{reason_note(reason)}"


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
