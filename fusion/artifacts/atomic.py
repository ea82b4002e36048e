"""Atomic writes: a reader sees a whole file or directory, or none.

Every artifact of a run (store shards, manifests, maps, reports, models) is written to a
hidden temporary sibling and renamed into place, so an interrupted run never leaves a
half-written result that looks complete. One naming scheme for all of them:
``.NAME.tmp-PID-RANDOM`` for files and ``.NAME.partial-RANDOM`` for directories, so a
later run can recognise (and clean) what a killed one left behind.

Directories are published by `fusion.artifacts.lifecycle`, the one lifecycle every
output goes through; a failed write is named by `fusion.artifacts.write_faults`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_INFIX = ".tmp-"
PARTIAL_INFIX = ".partial-"
def temp_sibling(path: Path) -> Path:
    """A fresh hidden name next to ``path`` (unique per process and call)."""
    return path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def stale_temp_files(folder: Path) -> list[Path]:
    """Temporary files a killed writer left in ``folder``."""
    return sorted(p for p in folder.glob(f".*{TMP_INFIX}*") if p.is_file())


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], value: Any, *, indent: int | None = 2) -> Path:
    return write_text_atomic(path, json.dumps(value, indent=indent, ensure_ascii=False))


def write_jsonl_atomic(path: str | os.PathLike[str], rows: Any) -> Path:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def partial_dir(out: Path) -> Path:
    """A new hidden staging directory beside ``out`` for a result built in one piece."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL_INFIX}", dir=out.parent))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(directory: Path) -> None:
    """Give the output the user's umask (temporary dirs and files are made 0700/0600)."""
    mask = _umask()
    directory.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            (Path(root) / name).chmod(0o777 & ~mask)
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                path.chmod(0o666 & ~mask)


def publish_dir(partial: Path, out: Path, *, replace: bool = False) -> Path:
    """Rename the finished ``partial`` directory to ``out`` (call it through
    `fusion.artifacts.lifecycle.writing`, which holds ``out``'s lock).

    With ``replace``, an existing ``out`` is swapped out first (renamed aside to
    ``.NAME.old-*``, then removed), so ``out`` is never a mix of old and new files. Without
    it, an existing ``out`` (a concurrent writer finished first) wins and ``partial`` is
    removed. The result gets the user's umask (`tempfile.mkdtemp` makes 0700 directories).
    """
    apply_umask(partial)
    if out.exists():
        if not replace:
            shutil.rmtree(partial, ignore_errors=True)
            return out
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return out
    partial.rename(out)
    return out
