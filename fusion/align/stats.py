"""Alignment statistics: how each pivot position got its source distribution.

Counted per shard while it is aligned and kept with the shard (`fusion.artifacts.aligned_store`
writes them into its Arrow schema), so a resumed run sums what finished shards hold instead
of aligning them again; the manifest and the align output show the summary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fusion.align.projection import BOUNDARY, CATEGORIES, PROJECTED, RULES


@dataclass
class AlignStats:
    """Sums over pivot trained positions; `summary` turns them into shares and means."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros((len(CATEGORIES), len(RULES)), dtype=np.int64))
    """positions per (category, rule): categories and rules as `fusion.align.projection` names them"""
    kept: int = 0
    """entries kept (in pivot ids) over the positions with a source distribution"""
    surviving: int = 0
    """source entries consistent with the emitted prefix, over projected positions"""
    residual: float = 0.0
    """probability of the entries ending exactly at the pivot token's start, over projected positions"""

    def add(self, other: AlignStats) -> None:
        self.counts += other.counts
        self.kept += other.kept
        self.surviving += other.surviving
        self.residual += other.residual

    def to_json(self) -> str:
        return json.dumps({"counts": self.counts.tolist(), "kept": self.kept, "surviving": self.surviving,
                           "residual": self.residual})

    @classmethod
    def from_json(cls, text: str) -> AlignStats:
        raw = json.loads(text)
        return cls(np.asarray(raw["counts"], dtype=np.int64).reshape(len(CATEGORIES), len(RULES)),
                   int(raw["kept"]), int(raw["surviving"]), float(raw["residual"]))

    def summary(self) -> dict[str, Any]:
        """The manifest's ``statistics``: shares of trained pivot positions by rule (overall
        and per category: template text before a reply, reply text, closing token), the
        aligned share (boundary + projected), and the projection's mean surviving entries
        and residual mass."""
        total = int(self.counts.sum())
        by_rule = self.counts.sum(axis=0)
        aligned = int(by_rule[BOUNDARY] + by_rule[PROJECTED])
        projected = int(by_rule[PROJECTED])

        def shares(row: np.ndarray) -> dict[str, Any]:
            n = int(row.sum())
            return {"positions": n, **{rule: float(row[i]) / n if n else 0.0 for i, rule in enumerate(RULES)}}

        return {
            "positions": total,
            "aligned_fraction": aligned / max(1, total),
            "fallback_fraction": 1 - aligned / max(1, total),
            "mean_entries_kept": self.kept / max(1, aligned),
            "rules": shares(by_rule),
            "by_category": {name: shares(self.counts[c]) for c, name in enumerate(CATEGORIES)},
            "projection": {"positions": projected, "mean_surviving_entries": self.surviving / max(1, projected),
                           "mean_residual_mass": self.residual / max(1, projected)},
        }
