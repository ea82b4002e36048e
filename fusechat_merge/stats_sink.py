"""Collects per-tensor SCE decisions during a merge, for ``merge --report``.

mergekit calls the kernel deep inside its executor, so the kernel cannot return extra
data; it appends to the active collector instead (a no-op when none is active).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fusechat_merge.sce import SCEStats


@dataclass(frozen=True)
class TensorStats:
    tensor: str | None
    models: tuple[str, ...]
    stats: SCEStats


class _Recorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: list[TensorStats] | None = None

    def active(self) -> bool:
        return self._rows is not None

    def __call__(self, tensor: str | None, models: list[str], stats: SCEStats) -> None:
        with self._lock:
            if self._rows is not None:
                self._rows.append(TensorStats(tensor, tuple(models), stats))

    @contextmanager
    def collecting(self) -> Iterator[list[TensorStats]]:
        """Collect stats of every ``fusechat_sce`` tensor merged inside the block."""
        rows: list[TensorStats] = []
        with self._lock:
            self._rows = rows
        try:
            yield rows
        finally:
            with self._lock:
                self._rows = None


record_stats = _Recorder()
