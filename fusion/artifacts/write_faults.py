"""A failed write names what it failed to write: full disk, quota, read-only folder.

`write_fault` tells a write that failed because of where it goes (`WRITE_ERRNOS`) from any
other error; `write_faults_named` turns such a failure into a `StoreError` naming the
output and what of it is kept (not a traceback, and never the inputs' fault). Every output
is written under it (`fusion.artifacts.lifecycle.writing`).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fusion.artifacts.records import StoreError
from fusion.errors import causes

# Writes that fail because of where they go (full disk, quota, read-only or forbidden folder,
# file size limit), not because of what is written.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
_RUST_IO = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")  # how safetensors (Rust) reports an OS error


def write_fault(err: BaseException, out: str | os.PathLike[str]) -> str | None:
    """What went wrong, when ``err`` (or what caused it) is a failed write into ``out`` (its
    files, its hidden temporary siblings, or a folder above it to be made) of the kind
    `WRITE_ERRNOS` lists: ``No space left on device (PATH)``; None for any other error."""
    for current in causes(err):
        code = current.errno if isinstance(current, OSError) else None
        match = None if code is not None else _RUST_IO.search(str(current))
        code = int(match.group(1) or match.group(2)) if match else code
        where = getattr(current, "filename", None)
        if code in WRITE_ERRNOS and (where is None or _touches(Path(where), Path(out))):
            return os.strerror(code) + (f" ({where})" if where else "")
    return None


def _touches(path: Path, out: Path) -> bool:
    path, out = Path(os.path.normpath(path.absolute())), Path(os.path.normpath(out.absolute()))
    return (path == out or out in path.parents or path in out.parents
            or any(p.parent == out.parent and p.name.startswith(f".{out.name}") for p in (path, *path.parents)))


@contextmanager
def write_faults_named(out: Path, what: str, kept: Callable[[], str]) -> Iterator[None]:
    """A failed write into ``out`` (full disk, quota, read-only folder: `write_fault`)
    becomes a `StoreError` naming ``what`` was being written and what of it is ``kept()``."""
    try:
        yield
    except Exception as err:
        fault = write_fault(err, out)
        if fault is None:
            raise
        raise StoreError(f"cannot write {what} {out}: {fault}; {kept()}") from err
