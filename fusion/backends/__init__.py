"""Teacher scoring backends: given token sequences and the positions to score, return
the top-K next-token log-probabilities and the log-probability of the actual next token.

Two implementations behind one interface (`Backend`): ``hf`` (transformers, any device)
and ``vllm`` (``vllm.LLM`` with ``prompt_logprobs``). `make_backend` builds the one a
`fusion.options.LogitOptions` names, with its options: their defaults are declared there
alone.
"""

from __future__ import annotations

from fusion.backends.base import Backend, PositionScores, ScoringError
from fusion.errors import InputError
from fusion.options import BACKENDS, LogitOptions

__all__ = ["BACKENDS", "Backend", "PositionScores", "ScoringError", "make_backend"]


def make_backend(model: str, options: LogitOptions) -> Backend:
    """The ``options.backend`` backend, loading ``model`` as ``options`` say."""
    if options.backend == "hf":
        from fusion.backends.hf import HFBackend

        return HFBackend(model, options)
    if options.backend == "vllm":
        from fusion.backends.vllm import VLLMBackend

        return VLLMBackend(model, options)
    raise InputError(f"unknown backend {options.backend!r}; use one of {', '.join(BACKENDS)}", key="backend")
