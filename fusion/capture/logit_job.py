"""Teacher logit generation: corpus → encoded conversations → backend scores → logit store.

The corpus (or its ``--shard i/N`` block of rows) is encoded, split into store shards of
``rows_per_shard`` sequences, and each shard is scored and written atomically. A re-run
with the same options skips the shards on disk, so an interrupted run resumes and yields
the same store as an uninterrupted one (batches are formed inside a shard only, the
same way every time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from fusion.artifacts.lifecycle import refuse_overlap, writing
from fusion.artifacts.logit_store import (
    LogitStore,
    Manifest,
    SequenceLogits,
    StoreOptions,
    finish_run,
    shard_name,
    shards_kept,
    store_output,
    tokenizer_fingerprint,
    write_shard,
)
from fusion.artifacts.provenance import (
    files_fingerprint,
    model_fingerprint,
)
from fusion.artifacts.records import StoreError
from fusion.backends.base import Backend, PositionScores, ScoringError
from fusion.capture.throughput import Throughput
from fusion.data.batching import length_sorted_batches, padded_tokens
from fusion.data.content_cache import loaded_fingerprint
from fusion.data.conversations import (
    Encoded,
    EncodeReport,
    data_files,
    encode_rows,
    load_conversations,
    trained_positions,
)
from fusion.errors import InputError
from fusion.names import resolve_model
from fusion.options import LogitJob, LogitOptions, parse_shard
from fusion.runtime import stopping
from fusion.runtime.memory_faults import memory_faults_named
from fusion.runtime.progress import bar
from fusion.runtime.remote_code import RemoteCodeError, check_remote_code


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


def score_shard(
    backend: Backend,
    items: Sequence[tuple[str, Encoded]],
    meter: Throughput,
    *,
    batch_size: int,
    batch_tokens: int = 0,
    log: Callable[[str], None] = print,
    safe_point: Callable[[], None] = lambda: None,
) -> list[SequenceLogits]:
    """Score one shard's sequences; records come back in input order.

    The hf backend gets length-sorted batches of at most ``batch_size`` sequences and
    ``batch_tokens`` padded tokens; vLLM the whole shard (its scheduler batches). Each
    forward pass is counted in ``meter`` (real and padded tokens). ``safe_point`` is called
    before each batch (`fusion.runtime.stopping.check`: a stop drops the shard).
    """
    records: list[SequenceLogits | None] = [None] * len(items)
    lengths = [len(enc.input_ids) for _, enc in items]
    if backend.schedules_batches:
        batches = [list(range(len(items)))]
    else:
        batches = length_sorted_batches(lengths, batch_size, batch_tokens)
    positions = [trained_positions(np.asarray(enc.loss_mask)) for _, enc in items]

    def forward(part: list[int]) -> list[PositionScores]:
        scores = backend.score([items[i][1].input_ids for i in part], [positions[i] for i in part])
        tokens = sum(lengths[i] for i in part)
        meter.add(tokens, tokens if backend.schedules_batches else padded_tokens(lengths, part))
        return scores

    settings = f"batch_tokens (now {batch_tokens}) or batch_size (now {batch_size})"
    for batch in batches:
        safe_point()
        scored = halving_on_oom(forward, batch, settings=settings, meter=meter, log=log)
        for i, scores in zip(batch, scored, strict=True):
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
                seq_ce=float(-gold.astype(np.float64).mean()) if len(positions[i]) else float("nan"),
                text_sha1=enc.content_sha1,
            )
    return [r for r in records if r is not None]


def halving_on_oom(
    forward: Callable[[list[int]], list[PositionScores]], batch: list[int], *, settings: str,
    meter: Throughput, log: Callable[[str], None],
) -> list[PositionScores]:
    """``forward(batch)``; after a CUDA out-of-memory error, its two halves one after the
    other (once: a half that fails too is a ScoringError naming ``settings`` to lower).

    The retry runs outside the ``except`` block, so the failed pass's tensors are freed.
    """
    try:
        return forward(batch)
    except torch.cuda.OutOfMemoryError:
        if len(batch) == 1:
            raise ScoringError("CUDA out of memory on a single sequence: lower max_length, or spread the "
                               "model over the GPUs with device_map: auto") from None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = (len(batch) + 1) // 2
    meter.halved += 1
    log(f"CUDA out of memory on a batch of {len(batch)} sequences: scoring it in two halves")
    try:
        return forward(batch[:half]) + forward(batch[half:])
    except torch.cuda.OutOfMemoryError:
        pass
    raise ScoringError(f"CUDA out of memory on a batch of {len(batch)} sequences, also after halving it: "
                       f"lower {settings}")


def _resolved_dtype(job: LogitJob) -> str:
    """The dtype the backend will really use (recorded in the manifest)."""
    if job.dtype != "auto" or job.backend != "hf":
        return job.dtype
    from fusion.backends.hf import resolve_device, resolve_dtype

    device = resolve_device("auto" if job.device_map else job.device)
    return str(resolve_dtype("auto", device)).removeprefix("torch.")


def load_model_parts(model: str, trust_remote_code: bool = False):
    """The tokenizer and config of ``model`` (resolved by `resolve_model`); an unloadable
    model is a StoreError that says which. A model that ships its own code is refused
    unless ``trust_remote_code`` (`fusion.runtime.remote_code`)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        check_remote_code(model, trust_remote_code)
    except RemoteCodeError as err:
        raise StoreError(str(err)) from None
    trust = {"trust_remote_code": trust_remote_code}
    try:
        return AutoTokenizer.from_pretrained(model, **trust), AutoConfig.from_pretrained(model, **trust)
    except (OSError, ValueError) as err:
        where = "" if Path(model).expanduser().exists() else " (no such local directory; tried the hub)"
        raise StoreError(f"cannot load model {model}{where}: {err}") from None


def data_fingerprint(source: str, rows) -> str:
    """sha256 of the local data files' bytes, or a hub dataset's own fingerprint."""
    files = data_files(source)
    if files is not None:  # the bytes that were parsed, when `load_conversations` read them
        return loaded_fingerprint(rows) or files_fingerprint(files)
    return f"datasets:{getattr(rows, '_fingerprint', '')}"


def generate_logits(job: LogitJob, *, progress: bool = True, log: Callable[[str], None] = print) -> Manifest:
    """Run (or resume) a logit job; returns the finished store's manifest.

    Everything that can be refused (paths, model, data, ``top_k`` against the vocabulary)
    is checked before the run record is written; the store is then written through the
    one output lifecycle (`fusion.artifacts.lifecycle.writing`: one writer at a time, a
    matching run resumed, a changed one refused unless ``overwrite``; a run that fails
    before its first shard removes the directory it created).
    """
    out = Path(job.out)
    job = replace(job, model=resolve_model(job.model))  # a cached hub id: its snapshot
    refuse_overlap(out, reads(job))  # before any model is loaded (again in `writing`)

    with memory_faults_named(f"scoring {job.data} with {job.model}", lambda: shards_kept(out),
                             lambda: less_memory(job)):
        tokenizer, config = load_model_parts(job.model, job.trust_remote_code)
        rows = load_conversations(job.data, split=job.split, cache_dir=job.cache_dir)
        return _generate(job, tokenizer, config, rows, progress=progress, log=log)


def reads(job: LogitJob) -> dict[str, str]:
    """What a scoring run reads (its output may overlap none of it)."""
    return {"model directory": job.model, "data": job.data}


def less_memory(job: LogitOptions) -> str:
    """The scoring options that need less memory, with their values now."""
    if job.backend == "vllm":
        return (f"lower gpu_memory_utilization (now {job.gpu_memory_utilization}) or max_length (now "
                f"{job.max_length}), or raise tensor_parallel_size (now {job.tensor_parallel_size})")
    return (f"lower batch_tokens (now {job.batch_tokens}), batch_size (now {job.batch_size}) or max_length "
            f"(now {job.max_length}); a model larger than the memory: dtype bfloat16, or device_map auto")


def _generate(job: LogitJob, tokenizer, config, rows, *, progress: bool, log: Callable[[str], None]) -> Manifest:

    indices = shard_rows(len(rows), job.shard)
    report = EncodeReport()
    encoded = list(encode_rows(rows, tokenizer, template=job.template, max_length=job.max_length,
                               strict=job.strict, report=report, indices=indices, source=job.data))
    skipped = report.skipped
    if not encoded and len(indices):
        first = f" (first: {next(iter(skipped.items()))})" if skipped else ""
        raise InputError(f"{job.data}: no usable row in {len(indices)} rows{first}", file=job.data)
    vocab_size = max(len(tokenizer), int(getattr(config, "vocab_size", 0) or 0))
    if job.top_k > vocab_size:
        raise InputError(f"--top-k {job.top_k} is above the vocabulary of {job.model} ({vocab_size} tokens)",
                         key="top_k", model=job.model)
    if job.backend == "vllm":  # before the run record: a misspelt engine option costs nothing
        from fusion.backends.vllm import check_engine_args, installed_engine_args

        check_engine_args(job.engine_args or {}, installed_engine_args())
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
    with writing(store_output(job.out, asdict(options), reads=reads(job)), overwrite=job.overwrite) as made:
        return _score_into(made.out, job, options, encoded, indices, len(rows), skipped, log=log, progress=progress)


def _score_into(out: Path, job: LogitJob, options: StoreOptions, encoded: list, indices: range, corpus: int,
                skipped: dict[str, str], *, log: Callable[[str], None], progress: bool) -> Manifest:
    from fusion.backends import make_backend

    chunks = [encoded[i : i + job.rows_per_shard] for i in range(0, len(encoded), job.rows_per_shard)]
    todo = [j for j in range(len(chunks)) if not (out / shard_name(j)).exists()]
    if len(todo) < len(chunks):
        log(f"resuming: {len(chunks) - len(todo)} of {len(chunks)} shards already on disk")
    total_tokens = sum(len(enc.input_ids) for j in todo for _, enc in chunks[j])
    scored = Throughput(0).record()  # a resumed run with nothing left to score
    if todo:
        backend = make_backend(job.model, job)
        meter = Throughput(total_tokens)  # from the loaded model on: the scoring rate alone
        with bar(total_tokens, "tok", unit_scale=True, enabled=progress, desc="scoring") as tokens:
            meter.on_tokens = tokens.update
            with stopping.watching():
                for j in todo:
                    def stopped_in(j: int = j) -> str:
                        kept = sum((out / shard_name(i)).exists() for i in range(len(chunks)))
                        return (f"shard {j + 1}/{len(chunks)} was being scored and is dropped; {kept} of "
                                f"{len(chunks)} shards are kept in {out}")
                    records = score_shard(backend, chunks[j], meter, batch_size=job.batch_size,
                                          batch_tokens=job.batch_tokens, log=log,
                                          safe_point=lambda f=stopped_in: stopping.check(f))
                    write_shard(out / shard_name(j), records, options.id_type)
                    log(f"shard {j + 1}/{len(chunks)}: {meter.line()}")
        scored = meter.record()
        backend.close()
        log(f"scored {scored['tokens']:,} tokens in {scored['seconds']:.1f}s ({scored['tokens_per_s']:,.0f} tok/s, "
            f"padding {scored['padding_share']:.0%})")
    scoring = {**scored, "shards_scored": len(todo), "shards_resumed": len(chunks) - len(todo)}
    manifest = finish_run(
        out, options, skipped, rows={"start": indices.start, "stop": indices.stop, "corpus": corpus},
        scoring=scoring,
    )
    store = LogitStore(out)
    log(
        f"store {out}: {manifest.sequences} sequences, {manifest.tokens:,} tokens, "
        f"{store.bytes_per_token():.1f} bytes/token"
    )
    return manifest
