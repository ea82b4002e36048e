"""``fusechat-merge align``: a pivot store + a source store → an aligned store.

The aligned store's format is in `fusion.artifacts.aligned_store`. Resumable shard by
shard, like the logit step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fusion.align.positions import (
    TokenView,
    dtw_alignment,
    map_distribution,
    offsets_alignment,
    token_pairs,
)
from fusion.align.projection import (
    CLOSING,
    FALLBACK,
    PROJECTED,
    PieceBytes,
    Plan,
    Projector,
    boundary_plan,
    categories,
    project_distribution,
    projection_plan,
)
from fusion.align.stats import AlignStats
from fusion.artifacts.aligned_store import shard_statistics, write_aligned_shard
from fusion.artifacts.lifecycle import refuse_overlap, writing
from fusion.artifacts.logit_store import (
    LOCATION_FIELDS,
    LogitStore,
    Manifest,
    SequenceLogits,
    finish_run,
    shard_name,
    shards_kept,
    store_output,
    tokenizer_fingerprint,
)
from fusion.artifacts.provenance import path_fingerprint, store_fingerprint
from fusion.artifacts.records import StoreError
from fusion.artifacts.vocab_map_file import FILE_NAME as VOCAB_MAP_FILE_NAME
from fusion.errors import InputError
from fusion.names import MISSING, resolve
from fusion.options import METHODS, StoreAlignment
from fusion.runtime import stopping
from fusion.runtime.memory_faults import memory_faults_named
from fusion.runtime.progress import bar


def view(seq: SequenceLogits, texts: Sequence[Hashable] | None = None) -> TokenView:
    """The aligner's view of a stored sequence; ``texts`` are its tokenizer's piece texts."""
    return TokenView(seq.input_ids, seq.loss_mask, seq.token_offsets, seq.reply_spans, texts)


def check_pair(pivot: LogitStore, source: LogitStore) -> None:
    """Same sequences (ids and conversation contents) in the same order, or a clear error
    naming the first mismatch. Rows without ids (ids are row indices) pair only when their
    contents match too."""
    for store in (pivot, source):
        if not store.has_row_fingerprints:
            raise StoreError(
                f"{store.path} is a version-{store.manifest.format_version} store without row "
                "fingerprints, so its rows cannot be paired safely; rescore it with "
                "`fusechat-merge logits --overwrite`"
            )
    p_ids, s_ids = pivot.ids(), source.ids()
    p_fps, s_fps = pivot.row_fingerprints(), source.row_fingerprints()
    for index, (a, b) in enumerate(zip(p_ids, s_ids, strict=False)):
        if a != b:
            raise StoreError(
                f"the stores disagree at sequence {index}: pivot has id {a!r}, source has {b!r} "
                f"({pivot.path} vs {source.path}); score the same corpus with both models"
            )
        if p_fps[index] != s_fps[index]:
            raise StoreError(
                f"the stores disagree at sequence {index} (id {a!r}): the conversation texts differ "
                f"({pivot.path} vs {source.path}); score the same corpus with both models"
            )
    if len(p_ids) != len(s_ids):
        raise StoreError(
            f"the pivot store has {len(p_ids)} sequences and the source store {len(s_ids)}; "
            f"first unmatched id: {(p_ids if len(p_ids) > len(s_ids) else s_ids)[min(len(p_ids), len(s_ids))]!r}"
        )


def load_tokenizer(store: LogitStore, model: str | None = None, option: str = "--source-model",
                   trust_remote_code: bool = False):
    """The store's tokenizer, from ``model`` (where it is now) or else the model directory
    the store records (gone when the work dir moved: then ``option`` says where it is);
    refused if it is not the one the store was scored with (its fingerprint), and if it
    ships its own code unless ``trust_remote_code``."""
    from transformers import AutoTokenizer

    from fusion.runtime.remote_code import RemoteCodeError, check_remote_code

    where = model or store.options.model
    if model is None and resolve(where).kind == MISSING:
        raise StoreError(f"{store.path} was scored with the model at {where}, which is not there any more "
                         "(moved?)", f"give the model's folder with {option}")
    try:
        check_remote_code(where, trust_remote_code)
    except RemoteCodeError as err:
        raise StoreError(f"{err} (align reads the tokenizer of the store {store.path})") from None
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise StoreError(f"cannot load the tokenizer of {store.path} from {where}: {err}") from None
    if tokenizer_fingerprint(tok) != store.options.tokenizer_fingerprint:
        raise StoreError(
            f"the tokenizer at {where} is not the one {store.path} was scored with "
            f"(fingerprint {tokenizer_fingerprint(tok)} vs {store.options.tokenizer_fingerprint})"
        )
    return tok


@dataclass(frozen=True)
class Tokenizers:
    """What alignment reads of the two tokenizers, built once per run: piece texts (pivot
    first; None: same tokenizer, ids are texts) and the projector (their piece bytes)."""

    texts: tuple[Sequence[Hashable] | None, Sequence[Hashable] | None] = (None, None)
    projector: Projector | None = None


def resolve_vocab_map(job: StoreAlignment, pivot: LogitStore, source: LogitStore, piv_vocab, src_vocab, out: Path):
    """Load the given map (checked against both tokenizers) or build one from this corpus;
    ``*_vocab`` are the tokenizers' `fusion.align.vocab_map.Vocabulary`."""
    from fusion.align.vocab_map import CooccurrenceCounts, VocabMap, build_vocab_map

    if job.vocab_map or (out / VOCAB_MAP_FILE_NAME).exists():
        return VocabMap.load(
            job.vocab_map or out / VOCAB_MAP_FILE_NAME,
            source_fingerprint=source.options.tokenizer_fingerprint,
            pivot_fingerprint=pivot.options.tokenizer_fingerprint,
        )
    counts = None
    if job.vocab_mode == "ms":
        counts = CooccurrenceCounts(pivot.options.vocab_size, source.options.vocab_size)
        for p_seq, s_seq in zip(pivot, source, strict=True):
            counts.add(*token_pairs(view(p_seq, piv_vocab.texts), view(s_seq, src_vocab.texts)))
    vmap = build_vocab_map(
        src_vocab, piv_vocab, mode=job.vocab_mode, counts=counts, source_vocab_size=source.options.vocab_size
    )
    vmap.save(out / VOCAB_MAP_FILE_NAME)
    return vmap


def align_sequence(
    p_seq: SequenceLogits,
    s_seq: SequenceLogits,
    src2piv: np.ndarray,
    k: int,
    plan_of: Callable[[TokenView, TokenView], Plan],
    tokenizers: Tokenizers = Tokenizers(),
) -> tuple[dict[str, Any], AlignStats]:
    """The aligned columns of one sequence, and its statistics.

    ``tokenizers.texts`` pair the template whitespace before a reply only where both sides
    have the same; ``tokenizers.projector`` is needed where ``plan_of`` projects."""
    p_view, s_view = view(p_seq, tokenizers.texts[0]), view(s_seq, tokenizers.texts[1])
    plan = plan_of(p_view, s_view)
    rule = plan.rule.copy()
    s_index = {int(t): i for i, t in enumerate(s_seq.positions)}
    gold = p_seq.input_ids[p_seq.positions + 1]
    category = categories(p_view, p_seq.positions + 1)
    s_closing = categories(s_view, s_seq.positions + 1) == CLOSING
    n = len(plan.source)
    ids = np.zeros((n, k), dtype=np.int64)
    lps = np.full((n, k), -np.inf, dtype=np.float32)
    target = np.full(n, np.nan, dtype=np.float32)
    stats = AlignStats()
    for j in np.flatnonzero(plan.source >= 0):
        t = int(plan.source[j])
        row = s_index[t]
        emitted = int(s_seq.input_ids[t + 1])
        if rule[j] == PROJECTED:
            projector = tokenizers.projector
            prefix = (projector.source.pieces[emitted] or b"")[: int(plan.prefix[j])]
            ids[j], lps[j], surviving, residual = project_distribution(
                s_seq.topk_ids[row], s_seq.topk_logprobs[row], (emitted, float(s_seq.target_logprobs[row])),
                prefix, projector, k)
            if not surviving:
                rule[j] = FALLBACK
                continue
            stats.surviving += surviving
            stats.residual += residual
        else:
            closing = (emitted, int(gold[j])) if category[j] == CLOSING and s_closing[row] else None
            ids[j], lps[j], _ = map_distribution(s_seq.topk_ids[row], s_seq.topk_logprobs[row], src2piv, k, closing)
        kept = int(np.isfinite(lps[j]).sum())
        stats.kept += kept
        hit = np.flatnonzero(ids[j, :kept] == gold[j])
        target[j] = lps[j, hit[0]] if len(hit) else -np.inf
    np.add.at(stats.counts, (category, rule), 1)
    columns = {
        "src_topk_ids": ids.reshape(-1),
        "src_topk_logprobs": lps.astype(np.float16).reshape(-1),
        "src_aligned": rule != FALLBACK,
        "src_target_logprobs": target,
        "src_seq_ce": float(s_seq.seq_ce),
        "src_rule": rule,
    }
    return columns, stats


# The alignment's inputs: what a mismatch with its run record says.
ALIGNMENT_INPUTS = {
    "pivot_store": "the pivot store changed since this store was started",
    "source_store": "the source store changed since this store was started",
    "vocab_map_file": "the vocabulary map changed since this store was started",
}
# Where the inputs lay (for the reader; their fingerprints above are compared).
ALIGNMENT_LOCATIONS = (*LOCATION_FIELDS, "align_source", "vocab_map")


def align_stores(job: StoreAlignment, *, progress: bool = True, log: Callable[[str], None] = print) -> Manifest:
    """Run (or resume) an alignment job; returns the aligned store's manifest.

    The output is checked against the inputs and the stores are paired before the run
    record is written; the aligned store is then written through the one output lifecycle
    (`fusion.artifacts.lifecycle.writing`)."""
    if job.method not in METHODS:
        raise InputError(f"unknown alignment method {job.method!r}; use one of {', '.join(METHODS)}", key="method")
    out = Path(job.out)
    reads = {"pivot store": job.pivot, "source store": job.source, "vocabulary map": job.vocab_map}
    refuse_overlap(out, reads)  # before the stores are read (again in `writing`)
    pivot, source = LogitStore(job.pivot), LogitStore(job.source)
    if pivot.manifest.alignment is not None:
        raise StoreError(f"{pivot.path} is already an aligned store; give the pivot's logit store")
    if source.manifest.alignment is not None:
        raise StoreError(f"{source.path} is an aligned store; give the source's logit store")
    check_pair(pivot, source)
    options = pivot.options
    run = {**asdict(options), "align_source": str(source.path), "align_method": job.method,
           "align_projection": job.projection, "vocab_map": job.vocab_map, "vocab_mode": job.vocab_mode,
           "pivot_store": store_fingerprint(pivot.path), "source_store": store_fingerprint(source.path),
           "vocab_map_file": path_fingerprint(job.vocab_map) if job.vocab_map else None}

    def less() -> str:
        return (f"smaller store shards (score with a lower rows_per_shard, now {options.rows_per_shard}) or "
                f"shorter sequences (max_length, now {options.max_length})"
                + ("; method offsets (dtw needs memory that grows with the square of a sequence's length)"
                   if job.method == "dtw" else ""))

    output = store_output(out, run, what="the aligned store", reads=reads, inputs=ALIGNMENT_INPUTS,
                          located=ALIGNMENT_LOCATIONS)
    with memory_faults_named(f"aligning {source.path} onto {pivot.path}", lambda: shards_kept(out), less), \
            writing(output, overwrite=job.overwrite):
        return _align(job, pivot, source, out, run, progress=progress, log=log)


def _align(job: StoreAlignment, pivot: LogitStore, source: LogitStore, out: Path, run: dict[str, Any], *,
           progress: bool, log: Callable[[str], None]) -> Manifest:
    options = pivot.options
    same_vocab = pivot.options.tokenizer_fingerprint == source.options.tokenizer_fingerprint
    k = options.top_k
    if same_vocab:
        src2piv = np.arange(max(pivot.options.vocab_size, source.options.vocab_size), dtype=np.int64)
        vocab_info: dict[str, Any] = {"mode": "identity (same tokenizer)"}
        tokenizers = Tokenizers()
    else:
        from fusion.align.vocab_map import vocabulary

        piv_vocab = vocabulary(load_tokenizer(pivot, job.pivot_model, "--pivot-model", job.trust_remote_code))
        src_vocab = vocabulary(load_tokenizer(source, job.source_model, "--source-model", job.trust_remote_code))
        vmap = resolve_vocab_map(job, pivot, source, piv_vocab, src_vocab, out)
        src2piv = vmap.src2piv
        tokenizers = Tokenizers((piv_vocab.texts, src_vocab.texts), Projector(
            PieceBytes.build(src_vocab.pieces, src_vocab.byte_piece),
            PieceBytes.build(piv_vocab.pieces, piv_vocab.byte_piece), src2piv))
        vocab_info = {"mode": vmap.mode, "file": str(job.vocab_map or out / VOCAB_MAP_FILE_NAME),
                      "exact_fraction": float(np.mean(vmap.exact))}
    plan_of = _position_planner(job, same_vocab, tokenizers)

    started = time.perf_counter()
    totals = AlignStats()
    start_row = 0
    shards = len(pivot.manifest.shards)

    def stopped_in(index: int) -> str:
        kept = sum((out / shard_name(i)).exists() for i in range(shards))
        return f"shard {index + 1}/{shards} was being aligned and is dropped; {kept} of {shards} shards are kept in {out}"

    with bar(len(pivot), "seq", enabled=progress, desc="aligning") as sequences, stopping.watching():
        for index, shard in enumerate(pivot.manifest.shards):
            rows = range(start_row, start_row + shard["sequences"])
            start_row += shard["sequences"]
            target = out / shard_name(index)
            if target.exists():  # finished by an earlier run: its statistics are kept with it
                totals.add(AlignStats.from_json(shard_statistics(target)))
            else:
                columns, shard_stats = [], AlignStats()
                for i in rows:
                    stopping.check(lambda index=index: stopped_in(index))
                    c, seq_stats = align_sequence(pivot[i], source[i], src2piv, k, plan_of, tokenizers)
                    columns.append(c)
                    shard_stats.add(seq_stats)
                write_aligned_shard(target, [pivot[i] for i in rows], columns, options.id_type, shard_stats.to_json())
                totals.add(shard_stats)
            sequences.update(len(rows))
    stats = totals.summary()
    alignment = {"source": str(source.path), "source_model": source.options.model, "method": job.method,
                 "projection": job.projection if job.method == "offsets" and not same_vocab else "off",
                 "pivot_store": run["pivot_store"], "source_store": run["source_store"],
                 "same_vocabulary": same_vocab, "vocab_map": vocab_info, "statistics": stats}
    manifest = finish_run(out, options, pivot.manifest.skipped, alignment)
    rules, projected, by_category = stats["rules"], stats["projection"], stats["by_category"]
    missed = sum(by_category[c]["positions"] * by_category[c]["fallback"] for c in ("reply", "closing"))
    replies = sum(by_category[c]["positions"] for c in ("reply", "closing"))
    log(
        f"aligned {len(pivot)} sequences in {time.perf_counter() - started:.1f}s: "
        f"{stats['aligned_fraction']:.1%} of positions aligned ({rules['boundary']:.1%} at a shared "
        f"boundary, {rules['projected']:.1%} projected), {stats['fallback_fraction']:.1%} fall back to "
        f"the pivot ({1 - missed / max(1, replies):.1%} of reply text and closing tokens aligned), "
        f"{stats['mean_entries_kept']:.2f} entries kept on average"
        + (f"; projected: {projected['mean_surviving_entries']:.2f} source entries survive on average, "
           f"residual mass {projected['mean_residual_mass']:.3f}" if projected["positions"] else "")
    )
    return manifest


def _position_planner(job: StoreAlignment, same_vocab: bool, tokenizers: Tokenizers) -> Callable[[TokenView, TokenView], Plan]:
    if same_vocab:
        return lambda p, s: boundary_plan(_identity_or_offsets(p, s))
    if job.method == "offsets" and job.projection == "on":
        piv_text, src_text = tokenizers.projector.pivot, tokenizers.projector.source
        return lambda p, s: projection_plan(p, s, offsets_alignment(p, s), piv_text, src_text)
    if job.method == "offsets":
        return lambda p, s: boundary_plan(offsets_alignment(p, s))
    # canonical texts (space marker → ' ', byte pieces decoded) so that 'Ã'+'Ħ' and 'Ä' compare
    piv_texts, src_texts = tokenizers.texts

    def by_dtw(p: TokenView, s: TokenView) -> Plan:
        return boundary_plan(dtw_alignment(p, s, piv_texts, src_texts, pivot_marker=" ", source_marker=" "))

    return by_dtw


def _identity_or_offsets(p: TokenView, s: TokenView) -> np.ndarray:
    """Same tokenizer: identical sequences need no alignment (copied through); otherwise an
    id is its own text, so the whitespace before a reply pairs where the ids agree."""
    if np.array_equal(p.input_ids, s.input_ids):
        return p.positions
    ids = range(int(max(p.input_ids.max(initial=0), s.input_ids.max(initial=0))) + 1)
    return offsets_alignment(replace(p, texts=ids), replace(s, texts=ids))
