"""The vLLM backend: ``vllm.LLM`` scoring with ``prompt_logprobs=K``, no real generation.

vLLM returns, for each prompt token i ≥ 1, the top-K tokens of the distribution that
predicts token i plus token i itself. Our position t predicts token t + 1, so it reads
entry t + 1. Where the installed vLLM has ``SamplingParams.flat_logprobs`` (0.32 has), the
entries come as one `FlatLogprobs` per prompt (flat lists: per position the prompt token
first, then ranks 1..K), read with numpy; otherwise as a dict {token id: Logprob} per
position (K or K + 1 entries). vLLM computes them from the raw logits
(``logprobs_mode="raw_logprobs"``, its default), the same quantity as the ``hf``
backend's ``log_softmax``.

vLLM refuses more than ``max_logprobs`` (20 by default) logprobs per position, so the
engine is started with ``max_logprobs = K``. The recipe's ``engine_args`` go to the engine
as they are, after `check_engine_args` compared them with the installed ``EngineArgs``.

Engine scripts need an ``if __name__ == "__main__":`` guard (vLLM spawns workers).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from fusion.backends.base import PositionScores, ScoringError
from fusion.errors import InputError
from fusion.options import LogitOptions

# Engine arguments this backend sets itself, and the option that sets each.
OWN_ENGINE_ARGS = {
    "model": "the model",
    "dtype": "dtype",
    "tensor_parallel_size": "tensor_parallel_size",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "max_model_len": "max_length",
    "max_logprobs": "top_k",
    "skip_tokenizer_init": "this backend (ids in, ids out)",
    "enable_prefix_caching": "this backend (cached prefixes would skip their prompt logprobs)",
}
# What to change when the engine does not fit the device (recipe keys of a model entry).
MEMORY_HINT = ("raise gpu_memory_utilization, lower max_length (vLLM's max_model_len), spread the "
               "model with tensor_parallel_size, or set engine_args such as kv_cache_dtype: fp8, "
               "max_num_seqs or max_num_batched_tokens (lower), enforce_eager: true")
_MEMORY_WORDS = ("memory", "kv cache", "cache blocks", "out of memory")


def require_vllm():
    """The ``vllm`` module, or a ScoringError saying how to install it."""
    try:
        import vllm
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ScoringError("the vllm backend needs vLLM: pip install 'fusechat-merge[vllm]' (CUDA) "
                           "or use --backend hf") from err
    return vllm


def installed_engine_args() -> frozenset[str]:
    """The field names of the installed vLLM's ``EngineArgs``."""
    require_vllm()
    from vllm.engine.arg_utils import EngineArgs

    return frozenset(f.name for f in dataclasses.fields(EngineArgs))


def check_engine_args(args: Mapping[str, Any], known: Collection[str]) -> None:
    """ValueError naming the first key of ``args`` that is not in ``known`` (with the
    nearest known name) or that this backend sets from one of its own options."""
    for key in args:
        if key in OWN_ENGINE_ARGS:
            raise InputError(f"engine_args: {key} is set from {OWN_ENGINE_ARGS[key]}, not here", key="engine_args")
        if key not in known:
            near = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise InputError(f"engine_args: {key!r} is not an engine option of the installed vLLM{hint}",
                             key="engine_args")


class VLLMBackend:
    name = "vllm"
    schedules_batches = True  # a whole store shard per generate(): vLLM's scheduler batches it

    def __init__(self, model: str, options: LogitOptions) -> None:
        """Reads ``top_k``, ``dtype``, ``tensor_parallel_size``, ``gpu_memory_utilization``,
        ``max_length``, ``engine_args`` and ``trust_remote_code`` of ``options``."""
        require_vllm()
        from vllm import LLM, SamplingParams

        engine_args = options.engine_args or {}
        check_engine_args(engine_args, installed_engine_args())
        self.top_k = top_k = options.top_k
        try:
            self.llm = LLM(
                model=model,
                dtype=options.dtype,
                tensor_parallel_size=options.tensor_parallel_size,
                gpu_memory_utilization=options.gpu_memory_utilization,
                max_model_len=options.max_length + 1,
                max_logprobs=top_k,
                skip_tokenizer_init=True,
                enable_prefix_caching=False,
                trust_remote_code=options.trust_remote_code,
                **engine_args,
            )
        except Exception as err:
            raise ScoringError(start_failure(model, err)) from err
        self.flat = hasattr(SamplingParams(), "flat_logprobs")
        self.params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False,
                                     **({"flat_logprobs": True} if self.flat else {}))

    def score(
        self, sequences: Sequence[Sequence[int]], positions: Sequence[np.ndarray]
    ) -> list[PositionScores]:
        prompts = [{"prompt_token_ids": list(map(int, seq))} for seq in sequences]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        read = scores_from_flat_logprobs if self.flat else scores_from_prompt_logprobs
        return [
            read(out.prompt_logprobs, seq, pos, self.top_k)
            for out, seq, pos in zip(outputs, sequences, positions, strict=True)
        ]

    def close(self) -> None:
        del self.llm


def start_failure(model: str, err: BaseException) -> str:
    """Why the engine did not start; the options to change when it looks like memory.

    vLLM's engine runs in a subprocess: its root cause (such as "No available memory for
    the cache blocks") is in the log above, and the exception only says the start failed.
    """
    text = " ".join(str(e) for e in (err, err.__cause__, err.__context__) if e is not None)
    if any(word in text.lower() for word in _MEMORY_WORDS):
        return f"vLLM cannot hold {model} on this device ({err}); {MEMORY_HINT}"
    return (f"vLLM could not start {model} ({err}); if the cause in the log above is memory "
            f"(KV cache, out of memory): {MEMORY_HINT}")


def scores_from_flat_logprobs(flat, sequence: Sequence[int], positions: np.ndarray, top_k: int) -> PositionScores:
    """Map one prompt's `FlatLogprobs` to the store's arrays (numpy, no dict per position).

    Per prompt position, vLLM lays out the prompt token's entry first, then ranks 1..K.
    """
    rows = np.asarray(positions, dtype=np.int64) + 1
    starts = np.asarray(flat.start_indices, dtype=np.int64)[rows]
    widths = np.asarray(flat.end_indices, dtype=np.int64)[rows] - starts
    if len(rows) and (widths != top_k + 1).any():
        t = int(positions[int(np.argmax(widths != top_k + 1))])
        raise ScoringError(f"vLLM returned a malformed prompt logprob entry at position {t}")
    ids = np.asarray(flat.token_ids, dtype=np.int64)
    values = np.asarray(flat.logprobs, dtype=np.float32)
    if len(rows) and (ids[starts] != np.asarray(sequence, dtype=np.int64)[rows]).any():
        raise ScoringError("vLLM's prompt logprobs do not start with the prompt token")
    top = starts[:, None] + 1 + np.arange(top_k)
    return PositionScores(ids[top], values[top], values[starts])


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
            raise ScoringError(f"vLLM returned no prompt logprobs for position {t}")
        ranked = sorted(entry.items(), key=lambda kv: _rank_key(kv[0], kv[1]))[:top_k]
        for col, (token, lp) in enumerate(ranked):
            ids[row, col] = int(token)
            values[row, col] = _logprob(lp)
        target = int(sequence[int(t) + 1])
        if target not in entry:
            raise ScoringError(f"vLLM omitted the prompt token's logprob at position {t}")
        gold[row] = _logprob(entry[target])
    return PositionScores(ids, values, gold)


def _rank_key(token: int, value: object) -> tuple[float, float, int]:
    """vLLM's own rank first (the prompt token may sit beyond K), then logprob."""
    rank = getattr(value, "rank", None)
    return (float(rank) if rank is not None else 0.0, -_logprob(value), int(token))


def _logprob(value: object) -> float:
    return float(getattr(value, "logprob", value))
