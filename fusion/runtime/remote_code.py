"""Models that ship their own Python code, and the one check before any of it runs.

A model folder whose ``config.json`` (or ``tokenizer_config.json``) has an ``auto_map``
names classes in Python files of the folder (InternLM2: ``modeling_internlm2.py``, its
own tokenizer class). transformers, vLLM and lm-eval import and run that code only with
``trust_remote_code``: arbitrary code, run with the user's rights on every machine that
loads the model. It is off by default everywhere; every loader here asks `check_remote_code`
first, so a model that needs it is refused with the file names and the key that allows it,
before anything is scored, rather than with transformers' message after hours of other work.

The code files are part of the model's fingerprint (`fusion.artifacts.provenance`, every
small file of the folder), so a changed ``modeling_*.py`` changes every stage key that
reads the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fusion.errors import InputError

CONFIG_FILES = ("config.json", "tokenizer_config.json")
FLAG = "--trust-remote-code"


class RemoteCodeError(InputError):
    """A model needs its own code to load and ``trust_remote_code`` was not given."""


def auto_map_entries(model_dir: str | os.PathLike[str]) -> list[str]:
    """``"FILE auto_map: AutoX → module.Class"`` for every ``auto_map`` entry of the folder's configs
    (empty: the model loads with transformers' own classes). Unreadable files count as none."""
    entries = []
    for name in CONFIG_FILES:
        try:
            raw = json.loads((Path(model_dir) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        mapping = raw.get("auto_map") if isinstance(raw, dict) else None
        for auto, target in (mapping or {}).items() if isinstance(mapping, dict) else []:
            targets = [t for t in (target if isinstance(target, list) else [target]) if t]
            entries.append(f"{name} auto_map: {auto} → {', '.join(map(str, targets))}")
    return entries


def code_files(model_dir: str | os.PathLike[str]) -> list[str]:
    """The Python files of the model folder (what ``trust_remote_code`` would run)."""
    folder = Path(model_dir)
    return sorted(p.name for p in folder.glob("*.py")) if folder.is_dir() else []


def needs_remote_code(model_dir: str | os.PathLike[str]) -> bool:
    return bool(auto_map_entries(model_dir))


def remote_code_risk(model: str, model_dir: str | os.PathLike[str], how_to_allow: str) -> str:
    """Why ``model`` is refused without remote code, and how to allow it (``how_to_allow``)."""
    files = code_files(model_dir)
    return (f"model {model} ships its own Python code ({'; '.join(auto_map_entries(model_dir))}"
            f"{'; files: ' + ', '.join(files) if files else ''}) and loads only with trust_remote_code, "
            "which runs that code with your rights on every machine that loads the model (the "
            f"Python files can do anything). Read them, then allow it with {how_to_allow}")


def check_remote_code(model: str | os.PathLike[str], trust_remote_code: bool, *, how_to_allow: str = FLAG) -> None:
    """Refuse a local model folder that needs remote code when it is not allowed (a hub id
    not on disk is left to the loader)."""
    folder = Path(model)
    if not trust_remote_code and folder.is_dir() and needs_remote_code(folder):
        raise RemoteCodeError(remote_code_risk(str(model), folder, how_to_allow))
