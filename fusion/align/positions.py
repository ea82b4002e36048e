"""Aligning a source model's top-K distributions to the pivot's tokens and vocabulary.

Two steps, both pure functions here (`align_stores` in `fusion.align.job` does the I/O):

1. **Positions.** A distribution at position t predicts token t + 1, so predictions are
   aligned, not input tokens: pivot position j and source position i correspond when the
   pivot token j + 1 and the source token i + 1 *start at the same character* of the same
   assistant reply. Where the pivot's next token starts inside a source token (no source
   token boundary there), no source distribution predicts it directly; `fusion.align.projection`
   conditions the one that predicted that source token on what it already emitted.
   Template whitespace just before a reply (Llama's space, ChatML's newline) is each
   template's own text: it pairs only with the same text on the other side.

   * ``offsets`` (default) reads the character spans stored with each token: exact.
   * ``dtw`` aligns the decoded token strings of each reply by edit-distance DTW
     (the paper's method, `fusion.align.dtw`), for parity with the reference and for data
     without offsets; a pivot token then takes the first source token aligned to it when
     the two strings start alike.

   FuseChat's reference code aligns *input* tokens and uses the source distribution at the
   aligned input token (its issues #27/#28 ask why), i.e. it pairs distributions that
   predict tokens starting at different characters whenever the two tokenizations split
   differently. Aligning predictions avoids that.

2. **Vocabulary.** Each source top-K entry is mapped to a pivot id with the vocabulary map
   (exact canonical text first, then the statistics-based choice; `fusion.align.vocab_map`),
   duplicates are merged by log-sum-exp, and the kept entries are renormalised.

Where no source distribution exists for a pivot position, the fusion stage falls back to
the pivot's own distribution (the reference puts a one-hot on the gold token in some of
these cases; a one-hot would teach certainty the source never expressed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from fusion.data.conversations import trained_positions


@dataclass(frozen=True)
class TokenView:
    """The parts of a stored sequence the aligner reads (numpy arrays)."""

    input_ids: np.ndarray  # (T,)
    loss_mask: np.ndarray  # (T,) bool
    token_offsets: np.ndarray  # (T, 2)
    reply_spans: np.ndarray  # (R, 2)
    # canonical text of every id of the tokenizer (`fusion.align.vocab_map.piece_texts`; for one
    # tokenizer the ids themselves), needed to pair the template whitespace in front of a
    # reply across tokenizers; None pairs none
    texts: Sequence[Hashable] | None = None

    @property
    def positions(self) -> np.ndarray:
        return trained_positions(self.loss_mask)


def reply_keys(view: TokenView, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(reply index, start relative to the reply) of the given (trained) tokens.

    A token is assigned to the reply holding its last character (so an end-of-turn token
    right after a reply belongs to it); a token that starts before the reply (a byte-level
    'Ġword' whose space is template text) counts as starting at the reply's start; a
    whitespace token ending exactly at a reply's start (a lone '▁') gets start -1 there.
    """
    starts = view.reply_spans[:, 0] if len(view.reply_spans) else np.zeros(0, dtype=np.int64)
    spans = view.token_offsets[tokens]
    last_char = np.maximum(spans[:, 1] - 1, spans[:, 0])
    leads = np.isin(spans[:, 1], starts) & (spans[:, 0] < spans[:, 1])
    reply = np.searchsorted(starts, np.where(leads, spans[:, 1], last_char), side="right") - 1
    safe = np.clip(reply, 0, max(len(starts) - 1, 0))
    reply_start = starts[safe] if len(starts) else np.zeros_like(safe)
    rel = np.where(leads, -1, np.maximum(spans[:, 0], reply_start) - reply_start)
    return np.where(reply >= 0, reply, -1), rel


def boundary_keys(view: TokenView, tokens: np.ndarray) -> np.ndarray:
    """An int64 key per token naming the boundary it starts at: (reply, start, rank).

    Byte-fallback pieces of one character share its span, so the rank counts the earlier
    tokens starting at the same character: the first piece of 'ï' matches a whole-'ï'
    token of the other side, the second piece only another second piece. Keys increase
    along the sequence; a token outside every reply gets -1.
    """
    reply, rel = reply_keys(view, tokens)
    n = len(reply)
    new_run = np.ones(n, dtype=bool)
    if n > 1:
        new_run[1:] = (reply[1:] != reply[:-1]) | (rel[1:] != rel[:-1])
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(n), 0)) if n else np.zeros(0, np.int64)
    rank = np.arange(n) - run_start
    keys = reply.astype(np.int64) * (1 << 40) + (rel.astype(np.int64) + 1) * (1 << 12) + np.minimum(rank, 4095)
    return np.where(reply >= 0, keys, -1)


def _lead_texts_agree(
    pivot: TokenView, p_tokens: np.ndarray, source: TokenView, s_tokens: np.ndarray
) -> np.ndarray:
    """Per matched token pair: False where the pair are the whitespace just before a reply
    (start -1) and their texts differ or are unknown.

    That whitespace is each template's own text (the Llama template's space, a lone '▁';
    ChatML's newline after 'assistant'), so two tokenizers' lead tokens share a key without
    being the same token: pairing them taught the pivot to put the source's newline where
    its own template has a space (28.7% of the demo's arithmetic positions had that target).
    """
    _, rel = reply_keys(pivot, p_tokens)
    lead = rel == -1
    agree = np.ones(len(p_tokens), dtype=bool)
    if not lead.any():
        return agree
    if pivot.texts is None or source.texts is None:
        agree[lead] = False
        return agree
    p_ids, s_ids = pivot.input_ids[p_tokens[lead]], source.input_ids[s_tokens[lead]]
    agree[lead] = [pivot.texts[int(a)] == source.texts[int(b)] for a, b in zip(p_ids, s_ids, strict=True)]
    return agree


def _match(pivot_keys: np.ndarray, source_keys: np.ndarray) -> np.ndarray:
    """Index into ``source_keys`` of each pivot key, or -1 (keys are sorted, unique)."""
    if not len(source_keys):
        return np.full(len(pivot_keys), -1, dtype=np.int64)
    at = np.clip(np.searchsorted(source_keys, pivot_keys), 0, len(source_keys) - 1)
    return np.where((source_keys[at] == pivot_keys) & (pivot_keys >= 0), at, -1)


def offsets_alignment(pivot: TokenView, source: TokenView) -> np.ndarray:
    """For each pivot trained position, the source position predicting the token that
    starts at the same reply character, or -1 (also for template whitespace in front of a
    reply unless both sides have the same text there: see `_lead_texts_agree`)."""
    piv_pos, src_pos = pivot.positions, source.positions
    found = _match(boundary_keys(pivot, piv_pos + 1), boundary_keys(source, src_pos + 1))
    out = np.where(found >= 0, src_pos[np.maximum(found, 0)], -1).astype(np.int64)
    hit = np.flatnonzero(out >= 0)
    out[hit[~_lead_texts_agree(pivot, piv_pos[hit] + 1, source, out[hit] + 1)]] = -1
    return out


def dtw_alignment(
    pivot: TokenView,
    source: TokenView,
    pivot_texts: Sequence[str],
    source_texts: Sequence[str],
    *,
    pivot_marker: str,
    source_marker: str,
    kernel: Callable[..., list[list[int]]] | None = None,
) -> np.ndarray:
    """Like `offsets_alignment`, from edit-distance DTW over each reply's token strings.

    ``*_texts`` give the text of each id (`fusion.align.vocab_map.piece_texts`: markers as
    spaces, byte pieces decoded; the reference aligns ``decode([id])`` strings), with
    ``*_marker`` the space marker in them. ``kernel`` defaults to `fusion.align.dtw.dtw_align`
    (the benchmark passes the plain reference DP).
    """
    from fusion.align.dtw import dtw_align

    kernel = kernel or dtw_align
    out = np.full(len(pivot.positions), -1, dtype=np.int64)
    piv_tokens = pivot.positions + 1
    src_tokens = source.positions + 1
    p_reply, _ = reply_keys(pivot, piv_tokens)
    s_reply, _ = reply_keys(source, src_tokens)
    for r in np.unique(p_reply[p_reply >= 0]):
        p_idx = np.flatnonzero(p_reply == r)
        s_idx = np.flatnonzero(s_reply == r)
        if not len(s_idx):
            continue
        p_str = [pivot_texts[int(pivot.input_ids[t])] for t in piv_tokens[p_idx]]
        s_str = [source_texts[int(source.input_ids[t])] for t in src_tokens[s_idx]]
        piv2src = kernel(s_str, p_str, src_marker=source_marker, piv_marker=pivot_marker)
        claimed: set[int] = set()
        last_p, last_s = len(p_str) - 1, len(s_str) - 1
        for j, partners in enumerate(piv2src):
            first = partners[0]
            end_of_turn = j == last_p and first == last_s  # the reply's closing tokens
            a = _strip(p_str[j], pivot_marker) or p_str[j]
            b = _strip(s_str[first], source_marker) or s_str[first]
            starts_alike = bool(a and b) and (a.startswith(b) or b.startswith(a))
            if first in claimed or not (starts_alike or end_of_turn):
                continue  # n-1: only the first pivot token of a group starts with the source token
            claimed.add(first)
            out[p_idx[j]] = src_tokens[s_idx[first]] - 1
    return out


def _strip(piece: str, marker: str) -> str:
    return piece.replace(marker, "") if marker else piece


def map_distribution(
    ids: np.ndarray, logprobs: np.ndarray, src2piv: np.ndarray, k: int, closing: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """One source top-K list → pivot ids: map, merge duplicates by log-sum-exp, renormalise.

    ``closing`` = (source id, pivot id) pairs the source's own end-of-turn token with the
    pivot's at a closing position, whatever the vocabulary map says (Llama-3's
    '<|eot_id|>' is not its eos). Returns (ids, logprobs) padded to ``k`` with id 0 and
    -inf, best first, and the number of kept entries.
    """
    valid = np.isfinite(logprobs)
    mapped = src2piv[ids[valid]]
    if closing is not None:
        mapped = np.where(ids[valid] == closing[0], closing[1], mapped)
    return merge_distribution(mapped, logprobs[valid], k)


def merge_distribution(mapped: np.ndarray, logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Entries already in pivot ids: merge duplicates by log-sum-exp, renormalise, keep the
    best ``k`` (ties keep the given order); padded with id 0 and -inf.

    Plain Python: a top-K list is a handful of entries, where numpy's per-call overhead
    would be most of the alignment's time."""
    out_ids = np.zeros(k, dtype=np.int64)
    out_lp = np.full(k, -np.inf, dtype=np.float32)
    if not len(mapped):
        return out_ids, out_lp, 0
    lps = np.asarray(logprobs, dtype=np.float64).tolist()
    peak = max(lps)
    mass: dict[int, float] = {}  # insertion order: first occurrence, for ties
    for pid, lp in zip(np.asarray(mapped).tolist(), lps, strict=True):
        mass[pid] = mass.get(pid, 0.0) + math.exp(lp - peak)
    total = sum(mass.values())
    best = sorted(mass, key=mass.__getitem__, reverse=True)[:k]  # stable: ties keep the order
    n = len(best)
    out_ids[:n] = best
    out_lp[:n] = [math.log(mass[pid] / total) for pid in best]
    return out_ids, out_lp, n


def token_pairs(pivot: TokenView, source: TokenView) -> tuple[np.ndarray, np.ndarray]:
    """(pivot id, source id) of the trained tokens that start at the same reply character:
    the co-occurrence evidence for the statistics-based vocabulary map."""
    p_tok = pivot.positions + 1
    s_tok = source.positions + 1
    found = _match(boundary_keys(pivot, p_tok), boundary_keys(source, s_tok))
    hit = found >= 0
    hit[hit] = _lead_texts_agree(pivot, p_tok[hit], source, s_tok[found[hit]])
    return (
        pivot.input_ids[p_tok[hit]].astype(np.int64),
        source.input_ids[s_tok[found[hit]]].astype(np.int64),
    )
