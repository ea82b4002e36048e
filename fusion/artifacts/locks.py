"""One writer at a time per output: an advisory ``flock`` on a hidden lock file.

The kernel releases the lock when its process dies, so a killed run never blocks the next
one (a stale lock file of a dead process is simply taken); a second live writer is refused
at once, naming the process that holds it (`LockError`). Every output takes its lock in
`fusion.artifacts.lifecycle.writing`; the pipeline also locks its work dir and each stage.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from fusion.artifacts.records import StoreError


class LockError(StoreError):
    """Another live process writes the same output."""


def lock_path(out: Path) -> Path:
    """The lock file of an output: a hidden sibling ``.NAME.lock``."""
    out = Path(os.path.normpath(Path(out).absolute()))
    return out.with_name(f".{out.name}.lock")


_HELD: dict[str, int] = {}  # lock files this process holds exclusively → holds (nested ones too)


class OutputLock:
    """Hold ``path`` (a lock file) while writing an output; see the module doc.

    ``shared`` locks may be held by several processes at once (stages run one by one by a
    scheduler), but never beside an exclusive one (a whole run)."""

    def __init__(self, path: Path, what: str, *, shared: bool = False) -> None:
        self.path = Path(path)
        self.what = what
        self.shared = shared
        self._fd: int | None = None
        self._nested = False

    def _key(self) -> str:
        return os.path.normpath(self.path.absolute())

    def acquire(self) -> OutputLock:
        """Take the lock, or refuse at once naming its holder. A process that holds the
        lock exclusively already (``demo`` holds its work dir while it makes the models,
        then runs the recipe) takes it again as a nested hold: it never locks itself out."""
        if self._key() in _HELD:
            _HELD[self._key()] += 1
            self._nested = True
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockError(f"{self.what} is being written by another process ({self.holder()}); "
                                "wait for it to finish or stop it") from None
            except OSError as err:  # a file system without locks
                os.close(fd)
                raise StoreError(f"cannot lock {self.path} ({err.strerror}); the file system must "
                                 "support file locks") from None
            try:
                if self.path.stat().st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # its holder removed the file between our open and our lock: again
        if not self.shared:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                    "command": shlex.join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            _HELD[self._key()] = 1
        self._fd = fd
        return self

    def holder(self) -> str:
        """Who holds the lock, in words (as the holder wrote it)."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            info = {}
        if not info.get("pid"):
            return f"lock file {self.path}"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
        return (f"pid {info['pid']} on {info.get('host', '?')} since {since}: {info.get('command', '?')}; "
                f"lock file {self.path}")

    def release(self) -> None:
        """Remove the lock file (while still holding it: see `acquire`) and unlock. A shared
        holder leaves the file unless no one else holds it."""
        if self._nested:
            _HELD[self._key()] -= 1
            self._nested = False
            return
        if self._fd is None:
            return
        _HELD.pop(self._key(), None)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the last holder: no one waits on it
            self.path.unlink(missing_ok=True)
        except BlockingIOError:
            pass  # other shared holders: theirs to remove
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def locked(out: str | os.PathLike[str], what: str | None = None) -> OutputLock:
    """The lock of the output ``out`` (``with locked(out): ...``)."""
    return OutputLock(lock_path(Path(out)), what or str(out))


def process_alive(pid: Any) -> bool:
    """Whether another process of this host has the id ``pid`` (this one: no); what a
    record's pid says when its lock cannot be asked (``fusechat-merge status``)."""
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
