"""Run records: what made an output, compared when it is resumed.

A run record is a JSON file saying which options and input fingerprints an output was
started with (`read_record`, `write_record`). A resume compares it with what is wanted now
and says what changed, inputs first, in one form (`differences`). Used by every output
(`fusion.artifacts.lifecycle`) and by the pipeline's stage records.
`StoreError` is the error of an output that cannot be written, read or resumed as asked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusion.artifacts.atomic import write_json_atomic
from fusion.errors import FusionError


class StoreError(FusionError, RuntimeError):
    """An output that cannot be written, read or resumed as asked: ``reason`` says why,
    ``remedy`` what to do with the command that writes it (``--overwrite``, ``--resume``,
    another ``--out``). A pipeline run, which has none of those options, says its own
    remedy instead (`fusechat_merge.pipeline.runner`)."""

    def __init__(self, reason: str, remedy: str = "", **at: object) -> None:
        super().__init__(f"{reason}; {remedy}" if remedy else reason, **at)
        self.reason = reason
        self.remedy = remedy


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
