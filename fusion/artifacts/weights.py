"""A model directory's tensors by name, in whatever format transformers saved them:
``*.safetensors`` (preferred, as transformers prefers them) or ``pytorch_model*.bin``, each
sharded or not (its ``*.index.json`` lists the shards). Every stage that reads weights
itself (the merge's checks, the report's diagnostics) reads them here, one tensor at a
time: safetensors through its lazy handles, ``.bin`` through a memory-mapped ``torch.load``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from fusion.errors import InputError

FORMATS = (("model.safetensors.index.json", "*.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model*.bin"))


class WeightsError(InputError):
    """A weight file or index that cannot be read (named)."""


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight files of ``model_dir``: its safetensors shards, else its ``.bin`` ones
    (as listed by the index when there is one); empty when it holds neither."""
    model_dir = Path(model_dir)
    for index_name, pattern in FORMATS:
        index = model_dir / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise WeightsError(f"cannot read {index}: {err}") from err
            files = [model_dir / name for name in names]
            for path in files:
                if not path.is_file():
                    raise WeightsError(f"{index} lists {path.name}, which is missing from {model_dir}")
            return files
        files = sorted(model_dir.glob(pattern))
        if files:
            return files
    return []


class Weights:
    """The tensors of one model directory, opened lazily; use as a context manager."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self._stack = ExitStack()
        self._where: dict[str, Any] = {}
        for file in weight_files(self.model_dir):
            handle = self._open(file)
            self._where.update(dict.fromkeys(handle.keys(), (file, handle)))

    def _open(self, file: Path) -> Any:
        try:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                return self._stack.enter_context(safe_open(str(file), framework="pt"))
            import torch

            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # SafetensorError, pickle and zip errors, OSError: name the file
            self._stack.close()
            kind = "safetensors" if file.suffix == ".safetensors" else "weight"
            raise WeightsError(f"cannot read the {kind} file {file}: {err} (a corrupt or truncated file?)") from err

    def __enter__(self) -> Weights:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file(self, name: str) -> Path:
        return self._where[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        _, handle = self._where[name]
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def get(self, name: str) -> Any:
        _, handle = self._where[name]
        return handle[name] if isinstance(handle, dict) else handle.get_tensor(name)
