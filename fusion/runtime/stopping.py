"""Stop at a safe point on SIGTERM or SIGINT (preemption, ``scancel --signal``, Ctrl-C).

Schedulers send SIGTERM some seconds before they kill (SLURM ``--signal``, Kubernetes,
spot instances); a user presses Ctrl-C. Under `on_signals` (the commands that run long
work install it) the first of them is a request while a long loop watches for it
(`watching`): the loop asks `check` at each of its safe points (between scoring batches,
between aligned sequences, after each optimizer step: `fusion.train.trainer`) and raises
`Stopped` there, saying where it stopped and what it kept. Where nothing watches (a merge,
an evaluation: both are redone whole by the rerun) the signal stops the work at once. A
second Ctrl-C stops at once too; a repeated SIGTERM is ignored (a launcher forwards it to
its children, which are already stopping).

A command stopped so exits with ``128 + the signal number`` (143 for SIGTERM, 130 for
SIGINT), the shell's convention, which schedulers read as "killed by a signal": requeue.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """The work stopped on a signal. ``where``: where it stopped and what is kept (None:
    stopped at once, wherever it was); ``stage``: the pipeline stage(s) it stopped in.

    A BaseException like KeyboardInterrupt: no ``except Exception`` turns it into a
    failure (a stopped stage is not failed: the rerun resumes it)."""

    def __init__(self, signum: int, where: str | None = None) -> None:
        self.signum = signum
        self.where = where
        self.stage: str | None = None
        super().__init__(f"stopped by {signal_name(signum)}" + (f": {where}" if where else ""))

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal_name(self.signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_requested: int | None = None  # the signal that asked to stop, until the work stops
_watching = 0  # how many loops check for a stop request now
_notify: Callable[[str], None] | None = None
_active = False  # under on_signals


def requested() -> int | None:
    """The signal that asked this process to stop (None: none yet)."""
    return _requested


def check(where: Callable[[], str] | str | None = None) -> None:
    """A safe point: raise `Stopped` if a stop was asked (``where``: what to say about it)."""
    if _requested is not None:
        raise Stopped(_requested, where() if callable(where) else where)


@contextmanager
def watching() -> Iterator[None]:
    """A loop that calls `check` at its safe points runs inside: a signal then only asks it
    to stop there."""
    global _watching
    _watching += 1
    try:
        yield
    finally:
        _watching -= 1


def _handle(signum: int, frame: object) -> None:
    global _requested
    if _requested is not None:
        if signum == signal.SIGINT:  # Ctrl-C again: now
            raise Stopped(signum)
        return
    if not _watching:
        raise Stopped(signum)
    _requested = signum
    if _notify is not None:
        again = "; Ctrl-C again stops at once" if signum == signal.SIGINT else ""
        _notify(f"{signal_name(signum)}: stopping at the next safe point{again}")


@contextmanager
def on_signals(notify: Callable[[str], None] | None = None) -> Iterator[None]:
    """SIGTERM and SIGINT ask the work in the block to stop (see the module docstring);
    ``notify`` says so when one arrives. Only the main thread can have signal handlers:
    elsewhere the block runs as it is."""
    global _requested, _notify
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _active
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    saved_notify, _notify = _notify, notify or _stderr
    saved_active, _active = _active, True
    for s in SIGNALS:
        signal.signal(s, _handle)
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        _notify = saved_notify
        _active = saved_active
        _requested = None


def reclaim() -> None:
    """Take SIGTERM and SIGINT back under `on_signals` after a library replaced the handlers
    (``ray.init`` makes SIGTERM a bare ``sys.exit``)."""
    if _active and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handle)


def _stderr(message: str) -> None:
    try:
        sys.__stderr__.write(message + "\n")
        sys.__stderr__.flush()
    except (OSError, ValueError, AttributeError):
        pass
