"""What a name means, the one rule every command and recipe check follows: `resolve` tells
a local path from a Hugging Face Hub id that is in the cache and from one to fetch, for a
model (``path[@revision][+lora]``) or a dataset.

A hub id is read from the hub cache when it is there (at once, with or without
``HF_HUB_OFFLINE``), so a loader never asks the hub for files a cached snapshot lacks. One
that is not cached fails within seconds when the hub cannot be reached (offline mode, or no
connection to ``HF_ENDPOINT``) instead of letting transformers retry each file for minutes.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from fusion.artifacts.provenance import missing_weights
from fusion.errors import InputError, InputNotFound

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".csv", ".txt")
CONNECT_TIMEOUT = 3.0


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` (no path prefix, no data-file suffix): a Hugging Face Hub repository,
    used as such when no local path of that name exists."""
    return (
        bool(_HUB_ID.match(name))
        and not name.startswith((".", "/", "~"))
        and not name.endswith(_DATA_SUFFIXES)
    )


def split_ref(ref: str) -> tuple[str, str | None]:
    """``path[@revision][+lora]`` → (path, revision)."""
    path, _, rest = ref.split("+", 1)[0].partition("@")
    return path, rest or None


def hub_offline() -> bool:
    """True when the Hugging Face hub may not be reached (``HF_HUB_OFFLINE``)."""
    if os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "")).strip().lower() in (
        "1", "true", "yes", "on",
    ):
        return True
    try:
        import huggingface_hub

        return bool(huggingface_hub.is_offline_mode())
    except (ImportError, AttributeError):
        return False


def hub_endpoint() -> str:
    """The hub's address as huggingface_hub uses it (``HF_ENDPOINT``)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (offline mode, or no TCP connection to its endpoint
    within `CONNECT_TIMEOUT` seconds), or None when it can."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    endpoint = hub_endpoint()
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=CONNECT_TIMEOUT).close()
    except OSError as err:
        return f"the hub at {endpoint} cannot be reached ({err.strerror or err})"
    return None


def cached_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | None = None,
                    repo_type: Literal["model", "dataset"] = "model") -> Path | None:
    """The Hugging Face cache's snapshot directory of a hub repository, or None if not cached
    (a model's must hold its config.json)."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True, repo_type=repo_type
        )
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, ValueError):
        return None
    snapshot = Path(path)
    return snapshot if repo_type == "dataset" or is_model_dir(snapshot) else None


def local_path(path: str | os.PathLike[str], base_dir: Path) -> Path:
    """``path`` (``~`` expanded) relative to ``base_dir``, with ``..`` resolved by name: the
    same answer before and after ``base_dir`` exists (the kernel refuses ``WORK/../x``
    while ``WORK`` is missing)."""
    p = Path(path).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else Path(base_dir).absolute() / p))


LOCAL, CACHED, HUB, MISSING = "local", "cached", "hub", "missing"


@dataclass(frozen=True)
class Resolved:
    """What a name means: ``kind`` is `LOCAL` (a path that exists), `CACHED` (a hub id whose
    snapshot is in the Hugging Face cache), `HUB` (a hub id to fetch) or `MISSING` (a path
    that does not exist). ``path``: the local path or the cached snapshot (for `MISSING`,
    where it was looked for; None for `HUB`)."""

    name: str
    what: Literal["model", "dataset"]
    kind: str
    path: Path | None
    revision: str | None = None

    @property
    def for_loader(self) -> str:
        """What to hand a loader: the local path (also one that is missing: the loader names
        it), a model's cached snapshot, else the hub id as written (`datasets` reads its own
        cache)."""
        if self.path is None or (self.kind == CACHED and self.what == "dataset"):
            return self.name
        return str(self.path)

    def problem(self) -> str | None:
        """Why the name cannot be had here: a path that does not exist, or a hub id that is not
        cached while the hub cannot be reached; None when it can (local, cached, or fetchable)."""
        if self.kind == MISSING:
            hint = " (a hub dataset is named org/name)" if self.what == "dataset" and "/" not in self.name else ""
            return f"{self.what} path {self.path} does not exist{hint}"
        if self.kind == HUB:
            why = hub_unreachable()
            return None if why is None else not_cached(self.name, why, self.what)
        return None


def resolve(name: str | os.PathLike[str], base_dir: str | os.PathLike[str] | None = None, *,
            what: Literal["model", "dataset"] = "model", cache_dir: str | None = None) -> Resolved:
    """The one rule for "what is this name". A path that exists (relative to ``base_dir``,
    default the working directory) is local. Else an ``org/name`` (`looks_like_hub_id`)
    whose ``org`` is no local directory is a hub id: `CACHED` when the hub cache holds it,
    else `HUB`. Anything else is a `MISSING` path. A model may carry ``@revision`` and
    ``+lora`` (`split_ref`)."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    written = str(name)
    path, revision = split_ref(written) if what == "model" else (written, None)
    local = local_path(path, base)
    if local.exists():
        return Resolved(written, what, LOCAL, local, revision)
    if not (looks_like_hub_id(path) and not local_path(path.split("/", 1)[0], base).is_dir()):
        return Resolved(written, what, MISSING, local, revision)
    snapshot = cached_snapshot(path, revision, cache_dir, repo_type=what)
    return Resolved(written, what, CACHED if snapshot is not None else HUB, snapshot, revision)


def is_model_dir(path: Path) -> bool:
    """A folder with a config.json (what transformers and mergekit load)."""
    return (path / "config.json").is_file()


def model_problem(path: Path, *, weights: bool = True) -> str | None:
    """Why the local ``path`` is no model directory (a file; no config.json; with
    ``weights``, no weights to load), or None."""
    if not path.is_dir():
        return "is a file, not a model directory"
    if not is_model_dir(path):
        return "holds no config.json: not a model directory"
    return missing_weights(path) if weights else None


def joined(problem: str) -> str:
    """``" is a file..."`` after a path, or ``": it has..."`` for a sentence of its own."""
    return f" {problem}" if problem.startswith(("is ", "holds ")) else f": {problem}"


def model_dir(ref: str, work_dir: Path) -> Path | None:
    """The local directory of a recipe's model: a path (relative to the work dir, also one
    that does not exist), or a hub id's snapshot in the Hugging Face cache; None for a hub
    id that is not cached."""
    found = resolve(ref, work_dir)
    return found.path


def not_cached(ref: str, why: str, what: str = "model") -> str:
    """The message for a hub model or dataset that is neither local nor cached and cannot be fetched."""
    path, revision = split_ref(ref)
    at = f" at revision {revision!r}" if revision else ""
    return (f"{path!r} is not a local {'directory' if what == 'model' else 'path'}, and the hub {what} "
            f"{path!r}{at} is not in the Hugging Face cache and cannot be downloaded: {why}")


def resolve_model(name: str | os.PathLike[str], what: str = "model") -> str:
    """What to hand a loader for the model ``name`` (`resolve`): a local model directory as it
    is, a hub id's cached snapshot, or the hub id itself when it is not cached and the hub answers.

    Raises InputError (naming ``what``) for a missing or non-model local path (also one
    without its weights), and for a hub id that is not cached while the hub cannot be reached.
    """
    name = str(name)
    found = resolve(name)
    if found.kind == MISSING:
        raise InputNotFound(f"{what} path {name} does not exist", model=name, file=name)
    if found.kind == HUB:
        why = hub_unreachable()
        if why is not None:
            raise InputError(f"{what} {not_cached(name, why)}", model=name)
        return name
    assert found.path is not None
    problem = model_problem(found.path)
    if problem is not None:
        where = f"{what} path {name}" if found.kind == LOCAL else f"{what} {name} (cached at {found.path})"
        raise InputError(f"{where}{joined(problem)}", model=name)
    return name if found.kind == LOCAL else str(found.path)
