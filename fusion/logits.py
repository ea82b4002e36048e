"""Teacher logit generation: corpus → encoded conversations → backend scores → logit store.

The corpus (or its ``--shard i/N`` block of rows) is encoded, split into store shards of
``rows_per_shard`` sequences, and each shard is scored and written atomically. A re-run
with the same options skips the shards on disk, so an interrupted run resumes and yields
the same store as an uninterrupted one (batches are formed inside a shard only, the
same way every time).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusion.artifacts.logit_store import (
    LogitStore,
    Manifest,
    SequenceLogits,
    StoreError,
    StoreOptions,
    begin_run,
    finish_run,
    shard_name,
    tokenizer_fingerprint,
    write_shard,
)
from fusion.artifacts.provenance import (
    check_outputs,
    files_fingerprint,
    model_fingerprint,
    require_model_dir,
)
from fusion.data import (
    Encoded,
    EncodeReport,
    data_files,
    encode_rows,
    load_conversations,
    trained_positions,
)
from fusion.options import LogitOptions, parse_shard
from fusion.progress import bar


@dataclass(kw_only=True)
class LogitJob(LogitOptions):
    """One scoring run: a model over a corpus into a store, with its options."""

    model: str
    data: str
    out: str


def package_version() -> str:
    """This package's installed version (recorded in manifests; fusion/ never imports
    fusechat_merge, so it is read from the installed metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fusechat-merge")
    except PackageNotFoundError:
        return "unknown"


def shard_rows(n_rows: int, spec: str) -> range:
    """The contiguous block of row indices that ``--shard i/N`` covers."""
    index, count = parse_shard(spec)
    per = math.ceil(n_rows / count)
    return range(min(n_rows, index * per), min(n_rows, (index + 1) * per))


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
                text_sha1=enc.content_sha1,
            )
        on_batch(sum(lengths[i] for i in batch))
    return [r for r in records if r is not None]


def _resolved_dtype(job: LogitJob) -> str:
    """The dtype the backend will really use (recorded in the manifest)."""
    if job.dtype != "auto" or job.backend != "hf":
        return job.dtype
    from fusion.backends.hf import resolve_device, resolve_dtype

    return str(resolve_dtype("auto", resolve_device(job.device))).removeprefix("torch.")


def load_model_parts(model: str):
    """The tokenizer and config of ``model``; a missing local path or an unloadable
    model is a StoreError that says which (not a hub connection error)."""
    from transformers import AutoConfig, AutoTokenizer

    require_model_dir(model)
    try:
        return AutoTokenizer.from_pretrained(model), AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as err:
        where = "" if Path(model).expanduser().exists() else " (no such local directory; tried the hub)"
        raise StoreError(f"cannot load model {model}{where}: {err}") from None


def data_fingerprint(source: str, rows) -> str:
    """sha256 of the local data files' bytes, or a hub dataset's own fingerprint."""
    files = data_files(source)
    if files is not None:
        return files_fingerprint(files)
    return f"datasets:{getattr(rows, '_fingerprint', '')}"


def generate_logits(job: LogitJob, *, progress: bool = True, log: Callable[[str], None] = print) -> Manifest:
    """Run (or resume) a logit job; returns the finished store's manifest.

    Everything that can be refused (paths, model, data, ``top_k`` against the vocabulary)
    is checked before the run record is written; a run that fails before its first shard
    removes the directory it created.
    """
    out = Path(job.out)
    check_outputs(out, {"model directory": job.model, "data": job.data})
    tokenizer, config = load_model_parts(job.model)
    rows = load_conversations(job.data, split=job.split, cache_dir=job.cache_dir)
    created = not out.exists()
    try:
        return _generate(job, tokenizer, config, rows, progress=progress, log=log)
    except BaseException:
        if created and out.is_dir() and not any(out.glob("shard-*.arrow")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _generate(job: LogitJob, tokenizer, config, rows, *, progress: bool, log: Callable[[str], None]) -> Manifest:
    from fusion.backends import make_backend

    indices = shard_rows(len(rows), job.shard)
    report = EncodeReport()
    encoded = list(encode_rows(rows, tokenizer, template=job.template, max_length=job.max_length,
                               strict=job.strict, report=report, indices=indices))
    skipped = report.skipped
    if not encoded and len(indices):
        first = f" (first: {next(iter(skipped.items()))})" if skipped else ""
        raise ValueError(f"{job.data}: no usable row in {len(indices)} rows{first}")
    vocab_size = max(len(tokenizer), int(getattr(config, "vocab_size", 0) or 0))
    if job.top_k > vocab_size:
        raise ValueError(f"--top-k {job.top_k} is above the vocabulary of {job.model} ({vocab_size} tokens)")
    if skipped:
        log(f"skipped {len(skipped)} malformed rows (first: {next(iter(skipped.items()))})")
    options = StoreOptions(
        model=str(job.model),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=vocab_size,
        template=job.template,
        top_k=job.top_k,
        max_length=job.max_length,
        backend=job.backend,
        dtype=_resolved_dtype(job),
        data=str(job.data),
        shard=job.shard,
        rows_per_shard=job.rows_per_shard,
        package_version=package_version(),
        model_fingerprint=model_fingerprint(job.model),
        data_fingerprint=data_fingerprint(job.data, rows),
    )
    out = Path(job.out)
    begin_run(out, options, overwrite=job.overwrite)
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
        with bar(total_tokens, "tok", unit_scale=True, enabled=progress, desc="scoring") as tokens:
            for j in todo:
                records = score_shard(backend, chunks[j], job.batch_size, tokens.update)
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
