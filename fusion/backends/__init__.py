"""Teacher scoring backends: given token sequences and the positions to score, return
the top-K next-token log-probabilities and the log-probability of the actual next token.

Two implementations behind one interface (`Backend`): ``hf`` (transformers, any device)
and ``vllm`` (``vllm.LLM`` with ``prompt_logprobs``). `make_backend` builds one by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fusion.backends.base import Backend, PositionScores, ScoringError
from fusion.errors import InputError
from fusion.options import BACKENDS

__all__ = ["BACKENDS", "Backend", "PositionScores", "ScoringError", "make_backend"]


def make_backend(
    name: str,
    model: str,
    *,
    top_k: int,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    max_length: int = 2048,
    engine_args: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> Backend:
    if name == "hf":
        from fusion.backends.hf import HFBackend

        return HFBackend(model, top_k=top_k, dtype=dtype, device=device, device_map=device_map,
                         trust_remote_code=trust_remote_code)
    if name == "vllm":
        from fusion.backends.vllm import VLLMBackend

        return VLLMBackend(
            model,
            top_k=top_k,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_length=max_length,
            engine_args=engine_args,
            trust_remote_code=trust_remote_code,
        )
    raise InputError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}", key="backend")
