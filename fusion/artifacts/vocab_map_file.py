"""The vocabulary map file: source token id → pivot token id, tied to both tokenizers.

Built by `fusion.align.vocab_map.build_vocab_map`, saved in the aligned store's directory
(``vocab_map.json``) and reusable with ``align --vocab-map``. JSON with the two tokenizer
fingerprints (a map made for other tokenizers is refused: it would silently garble ids),
``src2piv`` and ``inexact`` (the source ids without an exact canonical-text match).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusion.artifacts.atomic import write_json_atomic
from fusion.errors import InputError
from fusion.options import VOCAB_MODES as MODES

FORMAT = "fusechat-vocab-map"
FORMAT_VERSION = 1
FILE_NAME = "vocab_map.json"


@dataclass
class VocabMap:
    """``src2piv[source id] = pivot id``, tied to the two tokenizers it was made for."""

    src2piv: np.ndarray  # int64 (source_vocab,)
    mode: str  # "ms" | "em" | "mined"
    source_fingerprint: str
    pivot_fingerprint: str
    exact: np.ndarray  # bool (source_vocab,): an exact canonical-text match

    def __post_init__(self) -> None:
        self.src2piv = np.asarray(self.src2piv, dtype=np.int64)
        self.exact = np.asarray(self.exact, dtype=bool)
        if self.mode not in MODES:
            raise ValueError(f"unknown vocab map mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.src2piv.ndim != 1 or self.exact.shape != self.src2piv.shape:
            raise ValueError(
                f"src2piv and exact must be 1-D of one length, got {self.src2piv.shape}, {self.exact.shape}"
            )

    def save(self, path: str | os.PathLike[str]) -> None:
        """JSON with the fingerprints; ``inexact`` lists the source ids without an exact match."""
        payload = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "mode": self.mode,
            "source_fingerprint": self.source_fingerprint,
            "pivot_fingerprint": self.pivot_fingerprint,
            "source_vocab": int(self.src2piv.size),
            "src2piv": self.src2piv.tolist(),
            "inexact": np.flatnonzero(~self.exact).tolist(),
        }
        write_json_atomic(path, payload, indent=None)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, source_fingerprint: str, pivot_fingerprint: str
    ) -> VocabMap:
        """Read a map, refusing one made for other tokenizers (it would silently garble ids)."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
            raise InputError(f"cannot read vocab map {path}: {exc}", file=str(path)) from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise InputError(f"{path} is not a vocab map file", file=str(path))
        found = (raw.get("source_fingerprint"), raw.get("pivot_fingerprint"))
        if found != (source_fingerprint, pivot_fingerprint):
            raise InputError(
                f"vocab map {path} was made for source tokenizer {found[0]} and pivot tokenizer "
                f"{found[1]}, not source {source_fingerprint} and pivot {pivot_fingerprint}", file=str(path)
            )
        src2piv = np.asarray(raw["src2piv"], dtype=np.int64)
        exact = np.ones(src2piv.size, dtype=bool)
        exact[np.asarray(raw["inexact"], dtype=np.int64)] = False
        return cls(src2piv, raw["mode"], found[0], found[1], exact)
