"""Model references as users write them: a local directory, or a Hugging Face Hub id
(``org/name``) that is read from the hub cache when it is there (also offline)."""

from __future__ import annotations

import json
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


def model_dir(ref: str, work_dir: Path) -> Path | None:
    """The local directory of a recipe's model: a path (relative to the work dir), or a hub
    id's snapshot in the Hugging Face cache; None for a hub id that is not cached."""
    local = Path(ref).expanduser()
    local = local if local.is_absolute() else work_dir / local
    if local.exists() or not looks_like_hub_id(ref) or (work_dir / ref.split("/")[0]).exists():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and kin): loaded from the hub later
        return None


def has_chat_template(model: Path) -> bool:
    """Whether the tokenizer saved in ``model`` carries a chat template (read, not loaded)."""
    if (model / "chat_template.jinja").is_file() or (model / "chat_template.json").is_file():
        return True
    config = model / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False
