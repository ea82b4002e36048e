"""A stage's key, computed from its job alone.

The key hashes the job's class and kind, every field of the job (a new field is in the key
without anyone adding it), the content of every input it reads that no stage of the run
writes (model directories, data and skill files: `fusion.artifacts.provenance.path_fingerprint`,
never mtimes), the keys of the stages that write the other inputs, and the package version.
A stage therefore reruns exactly when something it reads has changed, and everything
downstream of it with it. Paths under the work dir enter the key relative to it, so a work
dir moved or mounted elsewhere keeps its keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusechat_merge import __version__


def job_fields(job: Any) -> dict[str, Any]:
    """Every field of ``job`` (nested dataclasses included) as plain values."""
    return dataclasses.asdict(job)


def stage_key(job: Any, inputs: Sequence[tuple[str, str]], root: Path) -> str:
    """The key of ``job`` whose reads are ``inputs``: (path, content fingerprint or the key of
    the stage that writes it)."""
    parts = [type(job).__name__, job.kind, job_fields(job), [list(i) for i in inputs], __version__]
    blob = json.dumps(parts, sort_keys=True, default=str)
    blob = blob.replace(json.dumps(str(root))[1:-1], "$WORK")
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
