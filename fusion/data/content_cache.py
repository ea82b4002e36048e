"""`datasets`' cache for local data files, keyed by their content.

`datasets` keys the Arrow cache it prepares from a local file by the file's path and
modification time. A file rewritten in place with its size and mtime kept (``rsync -a``,
``cp -p`` and ``tar x`` leave files so) then reads back as the rows parsed last time, while
every record of ours fingerprints the new bytes. Loading through here names the builder's
config after the files' content fingerprint (`files_fingerprint`, the one the stores record):
new bytes make a new cache entry, the same bytes hit the old one, and the record of a load
(`loaded_fingerprint`) is the fingerprint of the bytes that were parsed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusion.artifacts.provenance import files_fingerprint
from fusion.errors import InputError

if TYPE_CHECKING:
    import datasets

# `datasets`' builders for local files (the ones whose cache is keyed by path and mtime)
PACKAGED_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})
_PREFIX = "content-"


def config_name(files: Sequence[Path]) -> str:
    """The builder config name that keys ``files``' cache entry by their bytes."""
    return _PREFIX + files_fingerprint(files)


def loaded_fingerprint(rows: Any) -> str | None:
    """The content fingerprint of the files ``rows`` were parsed from, when loaded here."""
    name = getattr(getattr(rows, "info", None), "config_name", None) or ""
    return name.removeprefix(_PREFIX) if name.startswith(_PREFIX) else None


def load_local(builder: str, files: Sequence[Path], *, split: str, cache_dir: str | None,
               names: Sequence[Path] | None = None) -> datasets.Dataset:
    """``datasets.load_dataset(builder)`` over local ``files``, cached by content.

    ``names`` are the paths handed to `datasets` (links of plain names, say); ``files``
    are read for the fingerprint. A file written while it is read is refused rather than
    recorded under bytes that were not the ones parsed.
    """
    import datasets

    before = [_stamp(f) for f in files]
    rows = datasets.load_dataset(builder, name=config_name(files), split=split, cache_dir=cache_dir,
                                 data_files={split: [str(f) for f in (names or files)]})
    for file, stamp in zip(files, before, strict=True):
        if _stamp(file) != stamp:
            raise InputError(f"{file}: changed while it was being read; read it again once nothing writes it",
                             file=str(file))
    return rows


@contextlib.contextmanager
def content_keyed_loads() -> Iterator[None]:
    """Within the block, every ``datasets.load_dataset`` of a packaged builder over local
    files, with no config name of its own, is cached by content (for libraries that load
    data themselves, as lm-eval does for a task's ``dataset_kwargs: {data_files: ...}``)."""
    import datasets

    original = datasets.load_dataset

    def load(path: str, name: str | None = None, *args: Any, data_files: Any = None, **kwargs: Any) -> Any:
        files = _local_files(data_files) if name is None and path in PACKAGED_BUILDERS else None
        if files:
            name = config_name(files)
        return original(path, name, *args, data_files=data_files, **kwargs)

    datasets.load_dataset = load
    try:
        yield
    finally:
        datasets.load_dataset = original


def _local_files(data_files: Any) -> list[Path] | None:
    """The files ``data_files`` names (a path, a list, or a split → path(s) mapping), in
    order, when every one is an existing local file; None otherwise (patterns, URLs)."""
    if isinstance(data_files, (str, os.PathLike)):
        values: list[Any] = [data_files]
    elif isinstance(data_files, dict):
        values = [v for split in sorted(data_files) for v in
                  (data_files[split] if isinstance(data_files[split], (list, tuple)) else [data_files[split]])]
    elif isinstance(data_files, (list, tuple)):
        values = list(data_files)
    else:
        return None
    files = [Path(v).expanduser() for v in values if isinstance(v, (str, os.PathLike))]
    if len(files) != len(values) or not files or not all(f.is_file() for f in files):
        return None
    return files


def _stamp(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file is written: its ctime cannot be set back, unlike its mtime."""
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
