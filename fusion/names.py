"""Model references as users write them: a local directory, or a Hugging Face Hub id
(``org/name``), the one rule every command follows.

A hub id is read from the hub cache when it is there (at once, with or without
``HF_HUB_OFFLINE``), so a loader never asks the hub for files a cached snapshot lacks. One
that is not cached fails within seconds when the hub cannot be reached (offline mode, or no
connection to ``HF_ENDPOINT``) instead of letting transformers retry each file for minutes.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from fusion.artifacts.provenance import InputError, missing_weights

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


def cached_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> Path | None:
    """The Hugging Face cache's snapshot directory of a hub model, or None if not cached."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True
        )
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, ValueError):
        return None
    snapshot = Path(path)
    return snapshot if (snapshot / "config.json").is_file() else None


def local_path(path: str | os.PathLike[str], base_dir: Path) -> Path:
    """``path`` (``~`` expanded) relative to ``base_dir``, with ``..`` resolved by name: the
    same answer before and after ``base_dir`` exists (the kernel refuses ``WORK/../x``
    while ``WORK`` is missing)."""
    p = Path(path).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else Path(base_dir).absolute() / p))


def names_hub_model(ref: str, base_dir: Path) -> bool:
    """A model reference (``path[@revision][+lora]``) that can only mean a hub repository:
    ``models/t9`` is a local path when ``models`` is a local directory."""
    path, _ = split_ref(ref)
    if not looks_like_hub_id(path):
        return False
    return not local_path(path.split("/", 1)[0], base_dir).is_dir()


def model_dir(ref: str, work_dir: Path) -> Path | None:
    """The local directory of a recipe's model: a path (relative to the work dir), or a hub
    id's snapshot in the Hugging Face cache; None for a hub id that is not cached."""
    local = local_path(ref, work_dir)
    if local.exists() or not names_hub_model(ref, work_dir):
        return local
    return cached_snapshot(*split_ref(ref))


def not_cached(ref: str, why: str) -> str:
    """The message for a hub model that is neither local nor cached and cannot be fetched."""
    path, revision = split_ref(ref)
    at = f" at revision {revision!r}" if revision else ""
    return (f"{path!r} is not a local directory, and the hub model {path!r}{at} is not in the "
            f"Hugging Face cache and cannot be downloaded: {why}")


def resolve_model(name: str | os.PathLike[str], what: str = "model") -> str:
    """What to hand a loader for the model ``name``: a local model directory as it is, a hub
    id's cached snapshot, or the hub id itself when it is not cached and the hub answers.

    Raises InputError (naming ``what``) for a missing or non-model local path (also one
    without its weights), and for a hub id that is not cached while the hub cannot be reached.
    """
    name = str(name)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{what} path {name} is a file, not a model directory")
        if not (path / "config.json").is_file():
            raise InputError(f"{what} path {name} holds no config.json: not a model directory")
        _check_weights(path, f"{what} path {name}")
        return name
    if not names_hub_model(name, Path.cwd()):
        raise InputError(f"{what} path {name} does not exist")
    snapshot = cached_snapshot(*split_ref(name))
    if snapshot is not None:
        _check_weights(snapshot, f"{what} {name} (cached at {snapshot})")
        return str(snapshot)
    why = hub_unreachable()
    if why is not None:
        raise InputError(f"{what} {not_cached(name, why)}")
    return name


def _check_weights(path: Path, named: str) -> None:
    problem = missing_weights(path)
    if problem is not None:
        raise InputError(f"{named}: {problem}")
