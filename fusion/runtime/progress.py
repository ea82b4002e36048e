"""Progress on long work: the one progress display, and its state reported for ``status``.

`bar` is the one progress display: a tqdm bar on the real terminal (`fusion.runtime.log_capture`:
also while the libraries' output goes to a log), or, when that is not a terminal (CI logs,
SLURM files), a plain line every `PLAIN_INTERVAL` seconds; inside a captured block it is
labelled with the block's stage. Under `reporting_to`, every bar, also one in a launched
subprocess (through `PROGRESS_FILE_ENV`), writes its state to a progress file (for
``fusechat-merge status``); `Follower` shows what such a subprocess reports.
`format_seconds` and `format_bytes_mb` write the figures of a summary line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TextIO

from tqdm import tqdm

from fusion.runtime.log_capture import current, terminal

PLAIN_INTERVAL = 300.0  # seconds between two plain progress lines
REPORT_INTERVAL = 5.0  # seconds between two progress reports to the stage's record
PROGRESS_FILE_ENV = "FUSECHAT_PROGRESS_FILE"  # where bars of a launched process report


def bar(total: float | None, unit: str, *, desc: str | None = None, enabled: bool = True,
        initial: float = 0, unit_scale: bool = False) -> tqdm:
    """A progress bar over ``total`` ``unit``s on the terminal, labelled with the stage that
    runs (``desc`` outside a stage: a standalone command); plain lines where the terminal
    is not one; its state reported to the stage. ``total`` None: a clock (a job with no
    countable unit)."""
    out = terminal()
    plain = not _isatty(out)
    captured = current()
    label = captured.label if captured is not None else (desc or unit)
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
def reporting_to(progress_file: str | os.PathLike[str]) -> Iterator[None]:
    """Run the block with every bar reporting its state to ``progress_file`` (also the bars
    of a process it launches: the variable is inherited)."""
    saved = os.environ.get(PROGRESS_FILE_ENV)
    os.environ[PROGRESS_FILE_ENV] = str(progress_file)
    try:
        yield
    finally:
        os.environ.pop(PROGRESS_FILE_ENV, None)
        if saved is not None:
            os.environ[PROGRESS_FILE_ENV] = saved


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
