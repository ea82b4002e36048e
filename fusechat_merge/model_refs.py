"""Model references as users write them: a local directory, or a Hugging Face Hub id
(``org/name``) that is read from the hub cache when it is there (also offline)."""

from __future__ import annotations

import os
import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".csv", ".txt")


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


def names_hub_model(ref: str, base_dir: Path) -> bool:
    """A model reference (``path[@revision][+lora]``) that can only mean a hub repository:
    ``models/t9`` is a local path when ``models`` is a local directory."""
    path, _ = split_ref(ref)
    if not looks_like_hub_id(path):
        return False
    first = Path(path.split("/", 1)[0]).expanduser()
    return not (first if first.is_absolute() else base_dir / first).is_dir()


def model_dir(ref: str, work_dir: Path) -> Path | None:
    """The local directory of a recipe's model: a path (relative to the work dir), or a hub
    id's snapshot in the Hugging Face cache; None for a hub id that is not cached."""
    local = Path(ref).expanduser()
    local = local if local.is_absolute() else work_dir / local
    if local.exists() or not names_hub_model(ref, work_dir):
        return local
    return cached_snapshot(*split_ref(ref))
