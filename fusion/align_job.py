"""``fusechat-merge align``: a pivot store + a source store → an aligned store.

The aligned store's format is in `fusion.artifacts.aligned_store`. Resumable shard by
shard, like the logit step.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fusion.align import (
    TokenView,
    dtw_alignment,
    map_distribution,
    offsets_alignment,
    token_pairs,
)
from fusion.artifacts.aligned_store import write_aligned_shard
from fusion.artifacts.logit_store import (
    LogitStore,
    Manifest,
    SequenceLogits,
    StoreError,
    begin_run,
    finish_run,
    shard_name,
    tokenizer_fingerprint,
)
from fusion.artifacts.provenance import check_outputs, store_fingerprint
from fusion.artifacts.vocab_map_file import FILE_NAME as VOCAB_MAP_FILE_NAME
from fusion.options import METHODS, AlignOptions
from fusion.progress import bar


@dataclass(kw_only=True)
class AlignJob(AlignOptions):
    """One alignment: a source store onto the pivot's store, into ``out``."""

    pivot: str
    source: str
    out: str


def view(seq: SequenceLogits, texts: Sequence[str] | None = None) -> TokenView:
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


def load_tokenizer(store: LogitStore):
    """The store's tokenizer, refusing one that changed since the store was written."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(store.options.model)
    if tokenizer_fingerprint(tok) != store.options.tokenizer_fingerprint:
        raise StoreError(
            f"the tokenizer at {store.options.model} is not the one {store.path} was scored with "
            f"(fingerprint {tokenizer_fingerprint(tok)} vs {store.options.tokenizer_fingerprint})"
        )
    return tok


def resolve_vocab_map(job: AlignJob, pivot: LogitStore, source: LogitStore, piv_tok, src_tok, out: Path):
    """Load the given map (checked against both tokenizers) or build one from this corpus."""
    from fusion.vocab_map import CooccurrenceCounts, VocabMap, build_vocab_map, piece_texts

    if job.vocab_map:
        return VocabMap.load(
            job.vocab_map,
            source_fingerprint=source.options.tokenizer_fingerprint,
            pivot_fingerprint=pivot.options.tokenizer_fingerprint,
        )
    cached = out / VOCAB_MAP_FILE_NAME
    if cached.exists():
        return VocabMap.load(
            cached,
            source_fingerprint=source.options.tokenizer_fingerprint,
            pivot_fingerprint=pivot.options.tokenizer_fingerprint,
        )
    counts = None
    if job.vocab_mode == "ms":
        counts = CooccurrenceCounts(pivot.options.vocab_size, source.options.vocab_size)
        p_texts, s_texts = piece_texts(piv_tok), piece_texts(src_tok)
        for p_seq, s_seq in zip(pivot, source, strict=True):
            counts.add(*token_pairs(view(p_seq, p_texts), view(s_seq, s_texts)))
    vmap = build_vocab_map(
        src_tok, piv_tok, mode=job.vocab_mode, counts=counts, source_vocab_size=source.options.vocab_size
    )
    vmap.save(cached)
    return vmap


def align_sequence(
    p_seq: SequenceLogits,
    s_seq: SequenceLogits,
    src2piv: np.ndarray,
    k: int,
    positions_of: Callable[[TokenView, TokenView], np.ndarray],
    texts: tuple[Sequence[str] | None, Sequence[str] | None] = (None, None),
) -> dict[str, Any]:
    """The aligned columns of one sequence, plus its counts for the statistics.

    ``texts`` are the pivot's and the source's piece texts (`fusion.vocab_map.piece_texts`),
    which pair the template whitespace before a reply only where both sides have the same."""
    src_for_piv = positions_of(view(p_seq, texts[0]), view(s_seq, texts[1]))
    s_index = {int(t): i for i, t in enumerate(s_seq.positions)}
    gold = p_seq.input_ids[p_seq.positions + 1]
    n = len(src_for_piv)
    ids = np.zeros((n, k), dtype=np.int64)
    lps = np.full((n, k), -np.inf, dtype=np.float32)
    target = np.full(n, np.nan, dtype=np.float32)
    kept_total = 0
    for j, t in enumerate(src_for_piv):
        if t < 0:
            continue
        row = s_index[int(t)]
        ids[j], lps[j], kept = map_distribution(s_seq.topk_ids[row], s_seq.topk_logprobs[row], src2piv, k)
        kept_total += kept
        hit = np.flatnonzero(ids[j, :kept] == gold[j])
        target[j] = lps[j, hit[0]] if len(hit) else -np.inf
    aligned = src_for_piv >= 0
    return {
        "src_topk_ids": ids.reshape(-1),
        "src_topk_logprobs": lps.astype(np.float16).reshape(-1),
        "src_aligned": aligned,
        "src_target_logprobs": target,
        "src_seq_ce": float(s_seq.seq_ce),
        "_positions": n,
        "_aligned": int(aligned.sum()),
        "_kept": kept_total,
    }


def align_stores(job: AlignJob, *, progress: bool = True, log: Callable[[str], None] = print) -> Manifest:
    """Run (or resume) an alignment job; returns the aligned store's manifest.

    The output is checked against the inputs and the stores are paired before the run
    record is written; a run that fails before its first shard removes what it created."""
    if job.method not in METHODS:
        raise ValueError(f"unknown alignment method {job.method!r}; use one of {', '.join(METHODS)}")
    out = Path(job.out)
    check_outputs(out, {"pivot store": job.pivot, "source store": job.source, "vocabulary map": job.vocab_map})
    pivot, source = LogitStore(job.pivot), LogitStore(job.source)
    if pivot.manifest.alignment is not None:
        raise StoreError(f"{pivot.path} is already an aligned store; give the pivot's logit store")
    if source.manifest.alignment is not None:
        raise StoreError(f"{source.path} is an aligned store; give the source's logit store")
    check_pair(pivot, source)
    options = pivot.options
    run = {**asdict(options), "align_source": str(source.path), "align_method": job.method,
           "vocab_map": job.vocab_map, "vocab_mode": job.vocab_mode,
           "pivot_store": store_fingerprint(pivot.path), "source_store": store_fingerprint(source.path)}
    created = not out.exists()
    try:
        return _align(job, pivot, source, out, run, progress=progress, log=log)
    except BaseException:
        if created and out.is_dir() and not any(out.glob("shard-*.arrow")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _align(job: AlignJob, pivot: LogitStore, source: LogitStore, out: Path, run: dict[str, Any], *,
           progress: bool, log: Callable[[str], None]) -> Manifest:
    options = pivot.options
    begin_run(out, run, overwrite=job.overwrite)
    same_vocab = pivot.options.tokenizer_fingerprint == source.options.tokenizer_fingerprint
    k = options.top_k
    texts: tuple[Sequence[str] | None, Sequence[str] | None] = (None, None)
    if same_vocab:
        src2piv = np.arange(max(pivot.options.vocab_size, source.options.vocab_size), dtype=np.int64)
        vocab_info: dict[str, Any] = {"mode": "identity (same tokenizer)"}
    else:
        from fusion.vocab_map import piece_texts

        piv_tok, src_tok = load_tokenizer(pivot), load_tokenizer(source)
        texts = (piece_texts(piv_tok), piece_texts(src_tok))
        vmap = resolve_vocab_map(job, pivot, source, piv_tok, src_tok, out)
        src2piv = vmap.src2piv
        vocab_info = {"mode": vmap.mode, "file": str(job.vocab_map or out / VOCAB_MAP_FILE_NAME),
                      "exact_fraction": float(np.mean(vmap.exact))}
    positions_of = _position_aligner(job.method, same_vocab, pivot, source)

    started = time.perf_counter()
    totals = {"positions": 0, "aligned": 0, "kept": 0}
    start_row = 0
    with bar(len(pivot), "seq", enabled=progress, desc="aligning") as sequences:
        for index, shard in enumerate(pivot.manifest.shards):
            rows = range(start_row, start_row + shard["sequences"])
            start_row += shard["sequences"]
            target = out / shard_name(index)
            columns = [align_sequence(pivot[i], source[i], src2piv, k, positions_of, texts) for i in rows]
            for c in columns:
                totals["positions"] += c["_positions"]
                totals["aligned"] += c["_aligned"]
                totals["kept"] += c["_kept"]
            if not target.exists():
                write_aligned_shard(target, [pivot[i] for i in rows], columns, options.id_type)
            sequences.update(len(rows))
    stats = {
        "aligned_fraction": totals["aligned"] / max(1, totals["positions"]),
        "fallback_fraction": 1 - totals["aligned"] / max(1, totals["positions"]),
        "mean_entries_kept": totals["kept"] / max(1, totals["aligned"]),
        "positions": totals["positions"],
    }
    alignment = {"source": str(source.path), "source_model": source.options.model, "method": job.method,
                 "pivot_store": run["pivot_store"], "source_store": run["source_store"],
                 "same_vocabulary": same_vocab, "vocab_map": vocab_info, "statistics": stats}
    manifest = finish_run(out, options, pivot.manifest.skipped, alignment)
    log(
        f"aligned {len(pivot)} sequences in {time.perf_counter() - started:.1f}s: "
        f"{stats['aligned_fraction']:.1%} of positions aligned, "
        f"{stats['fallback_fraction']:.1%} fall back to the pivot, "
        f"{stats['mean_entries_kept']:.2f} entries kept on average"
    )
    return manifest


def _position_aligner(method: str, same_vocab: bool, pivot: LogitStore, source: LogitStore):
    if same_vocab:
        return _identity_or_offsets
    if method == "offsets":
        return offsets_alignment
    from fusion.vocab_map import piece_texts

    # canonical texts (space marker → ' ', byte pieces decoded) so that 'Ã'+'Ħ' and 'Ä' compare
    piv_texts = piece_texts(load_tokenizer(pivot))
    src_texts = piece_texts(load_tokenizer(source))

    def by_dtw(p: TokenView, s: TokenView) -> np.ndarray:
        return dtw_alignment(p, s, piv_texts, src_texts, pivot_marker=" ", source_marker=" ")

    return by_dtw


def _identity_or_offsets(p: TokenView, s: TokenView) -> np.ndarray:
    """Same tokenizer: identical sequences need no alignment (copied through); otherwise an
    id is its own text, so the whitespace before a reply pairs where the ids agree."""
    if np.array_equal(p.input_ids, s.input_ids):
        return p.positions
    ids = range(int(max(p.input_ids.max(initial=0), s.input_ids.max(initial=0))) + 1)
    return offsets_alignment(replace(p, texts=ids), replace(s, texts=ids))
