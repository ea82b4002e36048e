"""What made an output, and may it be resumed: one mechanism for every stage.

Used by the logit and aligned stores, the trainer, the merge, ``logits-merge`` and the
pipeline's stage records alike:

* **Run records**: a JSON file saying which options and input fingerprints an output was
  started with (`read_record`, `write_record`). A resume compares it with what is wanted
  now and says what changed, inputs first, in one form (`differences`).
* **One writer at a time** (`OutputLock`): an advisory ``flock`` on a lock file. The
  kernel releases it when its process dies, so a killed run never blocks the next one; a
  second writer is refused at once, naming the process that holds it.
* **A failed write says what it failed to write** (`write_faults_named`).
* **Nothing half-made survives a failure** (`removed_unless`): an output a failed run
  created is removed unless it got as far as a piece a resume can use. Staging
  directories (`atomic.partial_dir`) carry `PARTIAL_MARKER`; they are used only under their
  output's lock, so whoever holds the lock removes those it finds (`remove_partials`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fusion.artifacts.atomic import PARTIAL_INFIX, write_fault, write_json_atomic
from fusion.errors import FusionError

PARTIAL_MARKER = ".fusechat-partial.json"
"""Written into every staging directory this tool creates (so only ours are removed)."""


class StoreError(FusionError, RuntimeError):
    """An output that cannot be written, read or resumed as asked: ``reason`` says why,
    ``remedy`` what to do with the command that writes it (``--overwrite``, ``--resume``,
    another ``--out``). A pipeline run, which has none of those options, says its own
    remedy instead (`fusechat_merge.pipeline.runner`)."""

    def __init__(self, reason: str, remedy: str = "", **at: object) -> None:
        super().__init__(f"{reason}; {remedy}" if remedy else reason, **at)
        self.reason = reason
        self.remedy = remedy


class LockError(StoreError):
    """Another live process writes the same output."""


# --------------------------------------------------------------------------- run records

def read_record(path: Path) -> dict[str, Any]:
    """A run record; a broken one is a `StoreError` naming the file."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{path}: broken run record ({err})") from None
    if not isinstance(record, dict):
        raise StoreError(f"{path}: broken run record (not a JSON object)")
    return record


def write_record(path: Path, record: Mapping[str, Any]) -> Path:
    return write_json_atomic(path, dict(record))


def differences(then: Mapping[str, Any], now: Mapping[str, Any], *, inputs: Mapping[str, str] | None = None,
                ignore: tuple[str, ...] = ()) -> list[str]:
    """What changed between the record ``then`` and the wanted ``now``, in words: the keys
    of ``inputs`` (key → what its change means) first, then the options. The keys in
    ``ignore`` are not compared: where the inputs lay (paths, kept for the reader: an input
    is compared by its content fingerprint, so a work dir moved or copied elsewhere still
    resumes) and the package version."""
    inputs = inputs or {}
    changed = [k for k, v in now.items() if k not in ignore and then.get(k) != v]
    said = [f"{inputs[k]} ({then.get(k)!r} then, {now[k]!r} now)" for k in changed if k in inputs]
    return said + [f"{k}: {then.get(k)!r} then, {now[k]!r} now" for k in changed if k not in inputs]


# --------------------------------------------------------------------------- locks

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


# --------------------------------------------------------------------------- partial outputs

def mark_partial(directory: Path, **info: Any) -> None:
    """Mark a staging directory as this tool's (with whatever ``info`` helps a reader)."""
    (directory / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid(), **info}), encoding="utf-8")


def remove_partials(out: Path) -> list[Path]:
    """Remove the marked staging directories of ``out`` that a killed writer left (call it
    holding ``out``'s lock: no live writer uses them then); returns them."""
    out = Path(os.path.normpath(Path(out).absolute()))
    removed = []
    if out.parent.is_dir():
        for path in out.parent.glob(f".{out.name}{PARTIAL_INFIX}*"):
            if path.is_dir() and not path.is_symlink() and (path / PARTIAL_MARKER).is_file():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextmanager
def removed_unless(out: Path, resumable: Callable[[Path], bool]) -> Iterator[None]:
    """Run the block; if it fails and created ``out`` without getting as far as anything
    ``resumable`` finds there, remove ``out`` (a corrected command is never blocked by it)."""
    created = not out.exists()
    try:
        yield
    except BaseException:
        if created and out.is_dir() and not resumable(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


@contextmanager
def write_faults_named(out: Path, what: str, kept: Callable[[], str]) -> Iterator[None]:
    """A failed write into ``out`` (full disk, quota, read-only folder: `atomic.write_fault`)
    becomes a `StoreError` naming ``what`` was being written and what of it is ``kept()``
    (not a traceback, and never the inputs' fault)."""
    try:
        yield
    except Exception as err:
        fault = write_fault(err, out)
        if fault is None:
            raise
        raise StoreError(f"cannot write {what} {out}: {fault}; {kept()}") from err
