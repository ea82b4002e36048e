"""What a person sees while a stage runs: our bar and summary on the terminal, everything the
libraries print in the stage's log.

`captured` runs a block with file descriptors 1 and 2 pointed at a log file (so C-level
writes and subprocesses land there too), ``sys.stdout``/``sys.stderr`` and the logging
handlers that wrote to them pointed there as well, and ``warnings`` shown there; our own
warnings (``fusion``, ``fusechat_merge``) also reach the terminal, once each. Everything is
restored afterwards. ``verbose`` copies the log to the terminal live.

`bar` is the one progress display: a tqdm bar on the real terminal, or, when that is not a
terminal (CI logs, SLURM files), a plain line every `PLAIN_INTERVAL` seconds. While a stage
is captured with a ``progress_file``, every bar of it, also one in a launched subprocess
(through `PROGRESS_FILE_ENV`), writes its state there (for ``fusechat-merge status``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO

from tqdm import tqdm

PLAIN_INTERVAL = 300.0  # seconds between two plain progress lines
REPORT_INTERVAL = 5.0  # seconds between two progress reports to the stage's record
PROGRESS_FILE_ENV = "FUSECHAT_PROGRESS_FILE"  # where bars of a launched process report
OUR_PACKAGES = ("fusion", "fusechat_merge")


@dataclass
class StageOutput:
    """The terminal and the log of the stage that runs now."""

    label: str
    terminal: TextIO
    log_path: Path


_current: StageOutput | None = None
_warned: set[str] = set()  # our warnings already shown on the terminal (once per process)


def terminal() -> TextIO:
    """Where our own lines go: the real terminal while a stage is captured, else stdout."""
    return _current.terminal if _current is not None else sys.stdout


def echo(message: str) -> None:
    """One line of ours on the terminal."""
    out = terminal()
    out.write(message + "\n")
    out.flush()


def bar(total: float | None, unit: str, *, desc: str | None = None, enabled: bool = True,
        initial: float = 0, unit_scale: bool = False) -> tqdm:
    """A progress bar over ``total`` ``unit``s on the terminal, labelled with the stage that
    runs (``desc`` outside a stage: a standalone command); plain lines where the terminal
    is not one; its state reported to the stage. ``total`` None: a clock (a job with no
    countable unit)."""
    out = terminal()
    plain = not _isatty(out)
    label = _current.label if _current is not None else (desc or unit)
    return _Bar(total=total, unit=unit, desc=label, initial=initial, disable=not enabled, leave=False,
                unit_scale=unit_scale, file=_PlainLines(out) if plain else out, dynamic_ncols=not plain,
                mininterval=0.5, ascii=plain or None, bar_format="{desc}: {elapsed}" if total is None else None)


class Follower:
    """A bar that shows the progress another process of this stage reports (a launched
    training): `poll` reads the stage's progress file and moves the bar."""

    def __init__(self) -> None:
        self.path = os.environ.get(PROGRESS_FILE_ENV)
        self.bar: Any = None

    def poll(self) -> None:
        state = _read_json(self.path) if self.path else None
        if not state:
            return
        if self.bar is None:
            self.bar = bar(state.get("total"), state.get("unit", ""), initial=state.get("n", 0))
            self.bar._report_to = None  # the other process reports
        self.bar.update(state.get("n", 0) - self.bar.n)
        postfix = {k: v for k, v in state.items() if k not in ("n", "total", "unit", "at", "rate")}
        if postfix:
            self.bar.set_postfix(postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class _Bar(tqdm):
    """tqdm that reports its state (count, total, unit, rate, postfix) to the running
    stage's progress file at most every `REPORT_INTERVAL` seconds, and when it closes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._report_to = _file_reporter()
        self._reported = 0.0
        self._postfix_values: dict[str, Any] = {}
        super().__init__(*args, **kwargs)

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        self._report()
        return shown

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)
        self._postfix_values = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        if not self.disable:
            self._report(force=True)
        super().close()

    def _report(self, force: bool = False) -> None:
        now = time.time()
        if self.disable or self._report_to is None or (not force and now - self._reported < REPORT_INTERVAL):
            return
        self._reported = now
        self._report_to({"n": self.n, "total": self.total, "unit": self.unit, "at": now,
                         "rate": self.format_dict.get("rate"), **self._postfix_values})


class _PlainLines:
    """A file for tqdm where the output is not a terminal: the bar's latest state as one line
    every `PLAIN_INTERVAL` seconds (none at the end: the stage's summary line says it)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.last = time.monotonic()

    def write(self, text: str) -> None:
        state = text.replace("\r", "").strip()
        if state and time.monotonic() - self.last >= PLAIN_INTERVAL:
            self.last = time.monotonic()
            self.out.write(state + "\n")
            self.out.flush()

    def flush(self) -> None:
        self.out.flush()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _file_reporter() -> Callable[[dict[str, Any]], None] | None:
    """Where a bar reports its state: the file of the stage that runs (also in a process the
    stage launched: the variable is inherited)."""
    path = os.environ.get(PROGRESS_FILE_ENV)
    if not path:
        return None

    from fusion.artifacts.atomic import write_json_atomic

    return lambda state: write_json_atomic(path, state)


@contextmanager
def captured(log_path: str | os.PathLike[str], *, label: str, verbose: bool = False,
             progress_file: str | os.PathLike[str] | None = None) -> Iterator[StageOutput]:
    """Run the block with the libraries' output (fds 1 and 2, sys.stdout/stderr, logging,
    warnings) appended to ``log_path``, live on the terminal too when ``verbose``; bars
    labelled ``label`` report to ``progress_file``."""
    global _current
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    real = _real_terminal()
    saved_fds = [os.dup(1), os.dup(2)]
    log = open(log_path, "ab", buffering=0)  # noqa: SIM115 (closed in finally)
    tee = _Tee(log, real) if verbose else None
    target = tee.write_fd if tee is not None else log.fileno()
    saved_streams = (sys.stdout, sys.stderr)
    handlers = _stream_handlers(saved_streams)
    saved_showwarning = warnings.showwarning
    previous = _current
    stage = StageOutput(label, real, log_path)
    saved_env = os.environ.get(PROGRESS_FILE_ENV)
    try:
        if progress_file is not None:
            os.environ[PROGRESS_FILE_ENV] = str(progress_file)
        os.dup2(target, 1)
        os.dup2(target, 2)
        sys.stdout, sys.stderr = _fd_stream(1), _fd_stream(2)
        for handler, stream in handlers:
            handler.setStream(sys.stderr if stream is saved_streams[1] else sys.stdout)
        warnings.showwarning = _show_warning(stage, saved_showwarning)
        _current = stage
        yield stage
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        sys.stdout, sys.stderr = saved_streams
        _current = previous
        if progress_file is not None:
            os.environ.pop(PROGRESS_FILE_ENV, None)
            if saved_env is not None:
                os.environ[PROGRESS_FILE_ENV] = saved_env
        warnings.showwarning = saved_showwarning
        for handler, stream in handlers:
            handler.setStream(stream)
        for fd in saved_fds:
            os.close(fd)
        if tee is not None:
            tee.close()
        log.close()
        real.flush()


_terminal_cache: dict[str, TextIO] = {}
_fd_streams: dict[int, TextIO] = {}


def _real_terminal() -> TextIO:
    """The terminal our lines go to while fd 1 points at a log: a stream on a copy of fd 1
    when ``sys.stdout`` writes to fd 1 (made once, kept), else ``sys.stdout`` as it is (a
    test runner's capture). Inside a captured block: that block's terminal."""
    if _current is not None:
        return _current.terminal
    try:
        fileno = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return sys.stdout
    if fileno != 1:
        return sys.stdout
    if "stdout" not in _terminal_cache:
        _terminal_cache["stdout"] = open(os.dup(1), "w", buffering=1, encoding="utf-8",  # noqa: SIM115
                                         errors="replace")
    return _terminal_cache["stdout"]


def _fd_stream(fd: int) -> TextIO:
    """A text stream that always writes to ``fd`` (made once and never closed: a library may
    keep it, e.g. a logging handler created while a stage ran)."""
    if fd not in _fd_streams:
        _fd_streams[fd] = open(fd, "w", buffering=1, encoding="utf-8", errors="replace",  # noqa: SIM115
                               closefd=False)
    return _fd_streams[fd]


def _stream_handlers(streams: tuple[TextIO, TextIO]) -> list[tuple[logging.StreamHandler, TextIO]]:
    """The logging handlers (any logger's) that write to ``streams``, with their stream."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    found = []
    for lg in loggers:
        for handler in lg.handlers:
            stream = getattr(handler, "stream", None)
            settable = not isinstance(getattr(type(handler), "stream", None), property)  # not lastResort's
            if isinstance(handler, logging.StreamHandler) and settable and any(stream is s for s in streams):
                found.append((handler, stream))
    return found


def _show_warning(stage: StageOutput, show: Callable[..., None]) -> Callable[..., None]:
    def showwarning(message, category, filename, lineno, file=None, line=None) -> None:
        show(message, category, filename, lineno, file, line)  # into the log (sys.stderr)
        text = str(message)
        if _is_ours(filename) and text not in _warned:
            _warned.add(text)
            stage.terminal.write(f"warning: {text}\n")
            stage.terminal.flush()

    return showwarning


def _is_ours(filename: str) -> bool:
    parts = Path(filename).parts
    return any(package in parts for package in OUR_PACKAGES)


class _Tee:
    """A pipe whose reader thread appends everything to the log and to the terminal."""

    def __init__(self, log: IO[bytes], terminal_stream: TextIO) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.log = log
        self.terminal = terminal_stream
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        while chunk := os.read(self.read_fd, 65536):
            self.log.write(chunk)
            self.terminal.write(chunk.decode("utf-8", errors="replace"))
            self.terminal.flush()

    def close(self) -> None:
        os.close(self.write_fd)  # fds 1 and 2 were restored: the pipe's last writer is gone
        self.thread.join(timeout=10)
        os.close(self.read_fd)


def format_bytes_mb(mb: float) -> str:
    """A peak memory for a summary line: MiB below 10 GiB, GiB above."""
    return f"{mb / 1024:.1f} GiB" if mb >= 10 * 1024 else f"{mb:.0f} MiB"


def format_seconds(seconds: float) -> str:
    """A duration for a summary line: 4.2s, 3m05s, 2h07m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
