"""A standalone command's output (``logits``, ``align``, ``fuse``, ``merge``, ``eval``) as a
stage's: its bar and one summary line on the terminal, the libraries' output in a log
(``--log``, default ``OUT.log`` beside the command's output once it is made), live with
``-v``."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from fusion.errors import FusionError
from fusion.runtime.progress import captured, echo, format_bytes_mb, format_seconds
from fusion.runtime.stopping import Stopped, on_signals

F = TypeVar("F", bound=Callable[..., Any])


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
    with captured(path, label=name, verbose=verbose):
        print(f"==> {name} {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
        try:
            yield
        except Stopped:  # what it made is kept to resume from: its log goes beside it
            if not log_file and Path(out).exists():
                shutil.move(path, default_log(out))
            raise
        except Exception as err:
            traceback.print_exc()  # into the log
            if isinstance(err, (FusionError, click.ClickException)):
                err.message += f"\n  full log: {path}"
            raise
    if not log_file:
        path = Path(shutil.move(path, default_log(out)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    echo(f"{name}: done in {format_seconds(time.perf_counter() - started)}, peak {format_bytes_mb(peak)}; "
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
