"""What a run was made from: fingerprints of its inputs (the check that no output is an input
is `fusion.artifacts.lifecycle.refuse_overlap`).

A store is resumed or reused only while its inputs are unchanged, so its run record holds a
fingerprint of each of them (`model_fingerprint`, `files_fingerprint`, `store_fingerprint`);
the tokenizer's is `fusion.artifacts.logit_store.tokenizer_fingerprint`.

Model fingerprint: sha256 over the bytes of every small file of the model directory
(``config.json``, ``generation_config.json``, tokenizer files: anything under 16 MiB) and,
for every weight file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.gguf``,
``*.h5``, ``*.msgpack``), its name, its size and its content: all of it up to 512 MiB, and
beyond that 1 MiB at the start, at the end and at 62 evenly spaced places in between (64 MiB
read per file, so a 7B model in 4 GiB shards costs a few seconds). Never the mtime: copying a
model keeps its fingerprint, rewriting a weight at the same path (fine-tuning into the same
folder, a different download) changes it. A change inside a large file that falls between
the sampled blocks is the one case it misses (a real fine-tune changes every block).
A hub id is recorded as ``hub:<id>`` (nothing local to read).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
SMALL_FILE = 16 * 2**20
WHOLE_FILE = 512 * 2**20
BLOCK = 2**20
BLOCKS = 64


def _hash_file(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with path.open("rb") as f:
        if size <= WHOLE_FILE:
            for block in iter(lambda: f.read(8 * BLOCK), b""):
                h.update(block)
            return
        step = (size - BLOCK) / (BLOCKS - 1)
        for i in range(BLOCKS):
            f.seek(int(i * step))
            h.update(f.read(BLOCK))


def model_fingerprint(model: str | os.PathLike[str]) -> str:
    """The fingerprint of a local model directory (see the module doc), or ``hub:<id>``."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return f"hub:{model}"
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if file.suffix in WEIGHT_SUFFIXES or file.stat().st_size <= SMALL_FILE:
            h.update(str(file.relative_to(path)).encode() + b"\0")
            _hash_file(h, file)
    return h.hexdigest()[:20]


def files_fingerprint(files: Iterable[str | os.PathLike[str]]) -> str:
    """sha256 over the names and full bytes of ``files`` (a corpus's data files)."""
    h = hashlib.sha256()
    for file in files:
        file = Path(file)
        h.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda: f.read(8 * BLOCK), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:20]


def path_fingerprint(path: str | os.PathLike[str]) -> str:
    """The content fingerprint of any input: a model directory (`model_fingerprint`), any
    other directory (every file's relative path and bytes, hidden ones aside), a file, or
    ``hub:<id>`` for what is not on disk."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return model_fingerprint(p)
    if p.is_dir():
        h = hashlib.sha256()
        for file in sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts)):
            h.update(str(file.relative_to(p)).encode() + b"\0" + files_fingerprint([file]).encode())
        return h.hexdigest()[:20]
    if p.is_file():
        return files_fingerprint([p])
    return f"hub:{path}"


def store_fingerprint(store_dir: str | os.PathLike[str]) -> str:
    """A finished store's fingerprint: the hash of its manifest, which lists its options
    (model, tokenizer and data fingerprints) and every shard's sha256."""
    data = (Path(store_dir) / "manifest.json").read_bytes()
    return hashlib.sha256(data).hexdigest()[:20]


_LOADABLE_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth", "*.gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def missing_weights(model: Path) -> str | None:
    """Why the model folder ``model`` (it has a config.json) cannot be loaded for its
    weights: none at all (an unfinished download or copy), or shards its index lists that
    are not there; None when they are there. Read, not loaded: seconds before any work."""
    model = Path(model)
    for index in _WEIGHT_INDEXES:
        if (model / index).is_file():
            try:
                shards = set(json.loads((model / index).read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                return f"its weight index {index} cannot be read ({err})"
            absent = sorted(s for s in shards if not (model / s).is_file())
            if absent:
                listed = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
                return (f"{listed} {'is' if len(absent) == 1 else 'are'} missing ({len(absent)} of the "
                        f"{len(shards)} weight files its {index} lists)")
            return None
    if any(next(model.glob(pattern), None) is not None for pattern in _LOADABLE_WEIGHTS):
        return None
    return ("it has a config.json but no weights (model.safetensors or pytorch_model.bin): an "
            "unfinished download or copy?")


