"""Teacher logit generation: corpus → encoded conversations → backend scores → logit store.

The corpus (or its ``--shard i/N`` block of rows) is encoded, split into store shards of
``rows_per_shard`` sequences, and each shard is scored and written atomically. A re-run
with the same options skips the shards on disk, so an interrupted run resumes and yields
the same store as an uninterrupted one (batches are formed inside a shard only, the
same way every time).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusion.data import Encoded, MalformedRow, load_conversations, parse_turns, render, row_id
from fusion.store import (
    LogitStore,
    Manifest,
    SequenceLogits,
    StoreOptions,
    begin_run,
    finish_run,
    shard_name,
    tokenizer_fingerprint,
    trained_positions,
    write_shard,
)


@dataclass
class LogitJob:
    """Everything ``fusechat-merge logits`` needs (its options, one to one)."""

    model: str
    data: str
    out: str
    backend: str = "hf"
    top_k: int = 10
    max_length: int = 2048
    template: str = "own"
    batch_size: int = 8
    dtype: str = "auto"
    device: str = "auto"
    shard: str = "0/1"
    rows_per_shard: int = 1024
    strict: bool = False
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    cache_dir: str | None = None
    split: str = "train"


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/N"`` → (i, N) with 0 ≤ i < N."""
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError as err:
        raise ValueError(f"--shard must look like i/N (for example 0/4), got {spec!r}") from err
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {spec}: need 0 <= i < N")
    return index, count


def shard_rows(n_rows: int, spec: str) -> range:
    """The contiguous block of row indices that ``--shard i/N`` covers."""
    index, count = parse_shard(spec)
    per = math.ceil(n_rows / count)
    return range(min(n_rows, index * per), min(n_rows, (index + 1) * per))


def encode_corpus(
    rows, tokenizer, *, template: str, max_length: int, strict: bool, indices: Sequence[int]
) -> tuple[list[tuple[str, Encoded]], dict[str, str]]:
    """Encode the selected rows; malformed ones are skipped with their reason (or raise)."""
    encoded: list[tuple[str, Encoded]] = []
    skipped: dict[str, str] = {}
    for index in indices:
        row = rows[index]
        rid = row_id(row, index)
        try:
            turns = parse_turns(row, rid)
            encoded.append(
                (rid, render(tokenizer, turns, template=template, max_length=max_length, row_id=rid))
            )
        except MalformedRow as err:
            if strict:
                raise
            skipped[rid] = err.reason
    return encoded, skipped


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def score_shard(
    backend, items: Sequence[tuple[str, Encoded]], batch_size: int, on_batch: Callable[[int], None]
) -> list[SequenceLogits]:
    """Score one shard's sequences; records come back in input order."""
    records: list[SequenceLogits | None] = [None] * len(items)
    lengths = [len(enc.input_ids) for _, enc in items]
    for batch in length_sorted_batches(lengths, batch_size):
        seqs = [items[i][1].input_ids for i in batch]
        positions = [trained_positions(np.asarray(items[i][1].loss_mask)) for i in batch]
        for i, pos, scores in zip(batch, positions, backend.score(seqs, positions), strict=True):
            rid, enc = items[i]
            gold = scores.target_logprobs.astype(np.float32)
            records[i] = SequenceLogits(
                id=rid,
                input_ids=np.asarray(enc.input_ids),
                loss_mask=np.asarray(enc.loss_mask, dtype=bool),
                token_offsets=np.asarray(enc.token_offsets, dtype=np.int32).reshape(-1, 2),
                reply_spans=np.asarray(enc.reply_spans, dtype=np.int32).reshape(-1, 2),
                topk_ids=scores.topk_ids,
                topk_logprobs=scores.topk_logprobs,
                target_logprobs=gold,
                seq_ce=float(-gold.astype(np.float64).mean()) if len(pos) else float("nan"),
            )
        on_batch(sum(lengths[i] for i in batch))
    return [r for r in records if r is not None]


def _resolved_dtype(job: LogitJob) -> str:
    """The dtype the backend will really use (recorded in the manifest)."""
    if job.dtype != "auto" or job.backend != "hf":
        return job.dtype
    from fusion.backends.hf import resolve_device, resolve_dtype

    return str(resolve_dtype("auto", resolve_device(job.device))).removeprefix("torch.")


def generate_logits(job: LogitJob, *, progress: bool = True, log: Callable[[str], None] = print) -> Manifest:
    """Run (or resume) a logit job; returns the finished store's manifest."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from fusechat_merge import __version__
    from fusion.backends import make_backend

    tokenizer = AutoTokenizer.from_pretrained(job.model)
    config = AutoConfig.from_pretrained(job.model)
    rows = load_conversations(job.data, split=job.split, cache_dir=job.cache_dir)
    indices = shard_rows(len(rows), job.shard)
    encoded, skipped = encode_corpus(
        rows, tokenizer, template=job.template, max_length=job.max_length, strict=job.strict, indices=indices
    )
    if skipped:
        log(f"skipped {len(skipped)} malformed rows (first: {next(iter(skipped.items()))})")
    options = StoreOptions(
        model=str(job.model),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=max(len(tokenizer), int(getattr(config, "vocab_size", 0) or 0)),
        template=job.template,
        top_k=job.top_k,
        max_length=job.max_length,
        backend=job.backend,
        dtype=_resolved_dtype(job),
        data=str(job.data),
        shard=job.shard,
        rows_per_shard=job.rows_per_shard,
        package_version=__version__,
    )
    out = Path(job.out)
    begin_run(out, options)
    chunks = [encoded[i : i + job.rows_per_shard] for i in range(0, len(encoded), job.rows_per_shard)]
    todo = [j for j in range(len(chunks)) if not (out / shard_name(j)).exists()]
    if len(todo) < len(chunks):
        log(f"resuming: {len(chunks) - len(todo)} of {len(chunks)} shards already on disk")
    total_tokens = sum(len(enc.input_ids) for j in todo for _, enc in chunks[j])
    if todo:
        backend = make_backend(
            job.backend,
            job.model,
            top_k=job.top_k,
            dtype=job.dtype,
            device=job.device,
            tensor_parallel_size=job.tensor_parallel_size,
            gpu_memory_utilization=job.gpu_memory_utilization,
            max_length=job.max_length,
        )
        started = time.perf_counter()
        with tqdm(total=total_tokens, unit="tok", unit_scale=True, disable=not progress, desc="scoring") as bar:
            for j in todo:
                records = score_shard(backend, chunks[j], job.batch_size, bar.update)
                write_shard(out / shard_name(j), records, options.id_type)
        backend.close()
        elapsed = time.perf_counter() - started
        log(f"scored {total_tokens:,} tokens in {elapsed:.1f}s ({total_tokens / max(elapsed, 1e-9):,.0f} tok/s)")
    manifest = finish_run(
        out, options, skipped, rows={"start": indices.start, "stop": indices.stop, "corpus": len(rows)}
    )
    store = LogitStore(out)
    log(
        f"store {out}: {manifest.sequences} sequences, {manifest.tokens:,} tokens, "
        f"{store.bytes_per_token():.1f} bytes/token"
    )
    return manifest
