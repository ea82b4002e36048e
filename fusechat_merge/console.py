"""A standalone command's output (``logits``, ``align``, ``fuse``, ``merge``, ``eval``) as a
stage's: its bar and one summary line on the terminal, the libraries' output in a log
(``--log``, default ``OUT.log`` beside the command's output once it is made), live with
``-v``."""

from __future__ import annotations

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

from fusion.progress import captured, echo, format_bytes_mb, format_seconds

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
        except Exception as err:
            traceback.print_exc()  # into the log
            if isinstance(err, click.ClickException):
                err.message += f"\n  full log: {path}"
            raise
    if not log_file:
        path = Path(shutil.move(path, default_log(out)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    echo(f"{name}: done in {format_seconds(time.perf_counter() - started)}, peak {format_bytes_mb(peak)}; "
         f"log: {path}")
