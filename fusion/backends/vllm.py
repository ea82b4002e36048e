"""The vLLM backend: ``vllm.LLM`` scoring with ``prompt_logprobs=K``, no real generation.

vLLM returns, for each prompt token i ≥ 1, a dict {token id: Logprob} holding the top-K
tokens of the distribution that predicts token i, plus token i itself when it is not
among them (so K or K + 1 entries). Our position t predicts token t + 1, so it reads
entry t + 1. vLLM computes these from the raw logits (``logprobs_mode="raw_logprobs"``,
its default), the same quantity as the ``hf`` backend's ``log_softmax``.

Engine scripts need an ``if __name__ == "__main__":`` guard (vLLM spawns workers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fusion.backends.base import PositionScores


class VLLMBackend:
    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        top_k: int,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_length: int = 2048,
    ) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as err:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "the vllm backend needs vLLM: pip install 'fusechat-merge[vllm]' "
                "(CUDA) or use --backend hf"
            ) from err
        self.top_k = top_k
        self.llm = LLM(
            model=model,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_length + 1,
            skip_tokenizer_init=True,
            enable_prefix_caching=False,  # cached prefixes would skip their prompt logprobs
        )
        self.params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False
        )

    def score(
        self, sequences: Sequence[Sequence[int]], positions: Sequence[np.ndarray]
    ) -> list[PositionScores]:
        prompts = [{"prompt_token_ids": list(map(int, seq))} for seq in sequences]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [
            scores_from_prompt_logprobs(out.prompt_logprobs, seq, pos, self.top_k)
            for out, seq, pos in zip(outputs, sequences, positions, strict=True)
        ]

    def close(self) -> None:
        del self.llm


def scores_from_prompt_logprobs(
    prompt_logprobs: Sequence[Mapping[int, object] | None],
    sequence: Sequence[int],
    positions: np.ndarray,
    top_k: int,
) -> PositionScores:
    """Map vLLM's per-position logprob dicts to the store's arrays."""
    ids = np.zeros((len(positions), top_k), dtype=np.int64)
    values = np.full((len(positions), top_k), -np.inf, dtype=np.float32)
    gold = np.zeros(len(positions), dtype=np.float32)
    for row, t in enumerate(positions):
        entry = prompt_logprobs[int(t) + 1]
        if entry is None:
            raise RuntimeError(f"vLLM returned no prompt logprobs for position {t}")
        ranked = sorted(entry.items(), key=lambda kv: _rank_key(kv[0], kv[1]))[:top_k]
        for col, (token, lp) in enumerate(ranked):
            ids[row, col] = int(token)
            values[row, col] = _logprob(lp)
        target = int(sequence[int(t) + 1])
        if target not in entry:
            raise RuntimeError(f"vLLM omitted the prompt token's logprob at position {t}")
        gold[row] = _logprob(entry[target])
    return PositionScores(ids, values, gold)


def _rank_key(token: int, value: object) -> tuple[float, float, int]:
    """vLLM's own rank first (the prompt token may sit beyond K), then logprob."""
    rank = getattr(value, "rank", None)
    return (float(rank) if rank is not None else 0.0, -_logprob(value), int(token))


def _logprob(value: object) -> float:
    return float(getattr(value, "logprob", value))
