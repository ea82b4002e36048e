"""What every scoring backend returns (`PositionScores`), provides (`Backend`) and raises
when scoring cannot go on (`ScoringError`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fusion.errors import FusionError


@dataclass
class PositionScores:
    """Scores of one sequence at its requested positions (P of them)."""

    topk_ids: np.ndarray  # (P, K) int64, by descending log-probability
    topk_logprobs: np.ndarray  # (P, K) float32
    target_logprobs: np.ndarray  # (P,) float32: log p(input_ids[t + 1]) at position t


class ScoringError(FusionError, RuntimeError):
    """Scoring cannot go on as configured (out of memory, an engine that cannot start); the
    message names the options to change. The CLI prints it and exits with code 1."""


class Backend(Protocol):
    name: str
    schedules_batches: bool
    """True: `score` takes a whole store shard and batches it itself (vLLM's scheduler);
    False: it takes the token-budget batches of `fusion.data.batching.length_sorted_batches`."""

    def score(
        self, sequences: Sequence[Sequence[int]], positions: Sequence[np.ndarray]
    ) -> list[PositionScores]:
        """Score each sequence at its positions t (predicting token t + 1)."""
        ...

    def close(self) -> None: ...
