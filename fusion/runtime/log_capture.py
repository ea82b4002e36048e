"""Where output goes while a stage or a command runs: everything the libraries print into a
log file, our own lines to the real terminal.

`captured` runs a block with file descriptors 1 and 2 pointed at a log file (so C-level
writes and subprocesses land there too), ``sys.stdout``/``sys.stderr`` and the logging
handlers that wrote to them pointed there as well, and ``warnings`` shown there; our own
warnings (``fusion``, ``fusechat_merge``) also reach the terminal, once each. Everything is
restored afterwards. ``verbose`` copies the log to the terminal live. `echo` writes one line
of ours to the real terminal, inside a captured block or not; `current` is the block that
captures now (its label names the bars, `fusion.runtime.progress`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TextIO

OUR_PACKAGES = ("fusion", "fusechat_merge")


@dataclass
class StageOutput:
    """The terminal and the log of the stage (or command) that runs now."""

    label: str
    terminal: TextIO
    log_path: Path


_current: StageOutput | None = None
_warned: set[str] = set()  # our warnings already shown on the terminal (once per process)


def current() -> StageOutput | None:
    """The captured block that runs now (None: none)."""
    return _current


def terminal() -> TextIO:
    """Where our own lines go: the real terminal while a stage is captured, else stdout."""
    return _current.terminal if _current is not None else sys.stdout


def echo(message: str) -> None:
    """One line of ours on the terminal."""
    out = terminal()
    out.write(message + "\n")
    out.flush()


@contextmanager
def captured(log_path: str | os.PathLike[str], *, label: str, verbose: bool = False) -> Iterator[StageOutput]:
    """Run the block with the libraries' output (fds 1 and 2, sys.stdout/stderr, logging,
    warnings) appended to ``log_path``, live on the terminal too when ``verbose``; ``label``
    names the block's bars."""
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
    try:
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

