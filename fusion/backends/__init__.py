"""Teacher scoring backends: given token sequences and the positions to score, return
the top-K next-token log-probabilities and the log-probability of the actual next token.

Two implementations behind one interface (`Backend`): ``hf`` (transformers, any device)
and ``vllm`` (``vllm.LLM`` with ``prompt_logprobs``). `make_backend` builds one by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

BACKENDS = ("hf", "vllm")


@dataclass
class PositionScores:
    """Scores of one sequence at its requested positions (P of them)."""

    topk_ids: np.ndarray  # (P, K) int64, by descending log-probability
    topk_logprobs: np.ndarray  # (P, K) float32
    target_logprobs: np.ndarray  # (P,) float32: log p(input_ids[t + 1]) at position t


class Backend(Protocol):
    name: str

    def score(
        self, sequences: Sequence[Sequence[int]], positions: Sequence[np.ndarray]
    ) -> list[PositionScores]:
        """Score each sequence at its positions t (predicting token t + 1)."""
        ...

    def close(self) -> None: ...


def make_backend(
    name: str,
    model: str,
    *,
    top_k: int,
    dtype: str = "auto",
    device: str = "auto",
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    max_length: int = 2048,
) -> Backend:
    if name == "hf":
        from fusion.backends.hf import HFBackend

        return HFBackend(model, top_k=top_k, dtype=dtype, device=device)
    if name == "vllm":
        from fusion.backends.vllm import VLLMBackend

        return VLLMBackend(
            model,
            top_k=top_k,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_length=max_length,
        )
    raise ValueError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
