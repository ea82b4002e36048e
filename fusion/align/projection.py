"""Byte-prefix projection: a source signal where the pivot's next token starts inside a source token.

Pivot position j predicts pivot token p, which starts at byte c of a reply. Where the source
has a token boundary at c, the source distribution there predicts the same thing (rule
*boundary*). Where c falls inside a source token s that starts at c0 < c, the source has
already emitted u = reply[c0:c] as part of s; its distribution at the position predicting
s, restricted to the entries whose bytes start with u and are longer than u, and
renormalised, is its distribution over what follows u (rule *projected*). Each kept entry
votes for the pivot token its remaining bytes start with: the longest pivot piece that is
a prefix of them (so byte-fallback pieces and multi-byte characters meet), else the
vocabulary map's choice. Entries that end exactly at c (the source would need another
token) are the *residual* mass: counted, then dropped. Where no stored entry is
consistent with u, the position falls back to the pivot's own distribution (*fallback*).

Positions are matched in bytes only inside reply text whose bytes both tokenizations spell
identically (checked per reply), and in the template text just before it where both sides'
tokens cover the same bytes (one template for both models); other template text, the
closing token and any reply whose bytes disagree keep the character-span rule of
`fusion.align.positions`.
Pure numpy, no I/O: `fusion.align.job` applies it per sequence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fusion.align.positions import TokenView, merge_distribution, reply_keys

FALLBACK, BOUNDARY, PROJECTED = 0, 1, 2
RULES = ("fallback", "boundary", "projected")
TEMPLATE, REPLY, CLOSING = 0, 1, 2
CATEGORIES = ("template", "reply", "closing")
_UNKNOWN = np.iinfo(np.int64).min
_REPLY_STRIDE = 1 << 40  # byte keys: reply * stride + start + offset (starts are < 2**32)
_START_OFFSET = 1 << 32


@dataclass(frozen=True)
class PieceBytes:
    """The bytes of every id of one tokenizer, and the pivot lookup 'longest piece that is a
    prefix of these bytes'."""

    pieces: Sequence[bytes | None]  # None: special/added token (literal text, never a prefix)
    lengths: np.ndarray  # int64 per id, -1 where the piece is None or empty
    by_bytes: dict[bytes, int]  # one id per byte string: a non-byte-fallback piece, then the lowest id
    longest: int

    @classmethod
    def build(cls, pieces: Sequence[bytes | None], byte_piece: np.ndarray | None = None) -> PieceBytes:
        """From `fusion.align.vocab_map.Vocabulary.pieces` (and ``byte_piece``, its byte-fallback flags)."""
        lengths = np.array([len(b) if b else -1 for b in pieces], dtype=np.int64)
        flags = byte_piece if byte_piece is not None else np.zeros(len(pieces), dtype=bool)
        by_bytes: dict[bytes, int] = {}
        for i in sorted(range(len(pieces)), key=lambda i: (bool(flags[i]), i)):
            if pieces[i]:
                by_bytes.setdefault(pieces[i], i)
        return cls(list(pieces), lengths, by_bytes, int(lengths.max(initial=0)))

    def sizes(self, ids: np.ndarray) -> np.ndarray:
        """Byte length of each id's piece; -1 for a special token or an id past the vocabulary
        (a model's padded rows)."""
        inside = ids < len(self.lengths)
        return np.where(inside, self.lengths[np.where(inside, ids, 0)], -1)

    def first_token(self, rest: bytes) -> int:
        """The id of the longest piece that ``rest`` starts with, or -1."""
        for n in range(min(len(rest), self.longest), 0, -1):
            found = self.by_bytes.get(rest[:n])
            if found is not None:
                return found
        return -1


def categories(view: TokenView, tokens: np.ndarray) -> np.ndarray:
    """Per token: TEMPLATE (whitespace just before a reply, each template's own text),
    CLOSING (at or after the reply's end: the end-of-turn token) or REPLY."""
    reply, rel = reply_keys(view, tokens)
    spans = view.reply_spans
    length = (spans[np.clip(reply, 0, None), 1] - spans[np.clip(reply, 0, None), 0]) if len(spans) else rel
    return np.where(rel < 0, TEMPLATE, np.where(rel >= length, CLOSING, REPLY)).astype(np.uint8)


def byte_starts(
    view: TokenView, tokens: np.ndarray, text: PieceBytes
) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[bytes, bytes]]]:
    """(reply, byte start relative to the reply's first byte, spelling) of ``tokens``.

    Starts are cumulative piece lengths from the reply's first token, whose template part
    (a leading space or newline) counts before byte 0. A start is unknown (int64 min) for a
    token outside a reply and from the first special token on. The spelling of a reply is
    (template bytes its tokens cover before it, its text's bytes): what both sides must
    agree on for their starts to be comparable.
    """
    reply, rel = reply_keys(view, tokens)
    starts = np.full(len(tokens), _UNKNOWN, dtype=np.int64)
    spelled: dict[int, tuple[bytes, bytes]] = {}
    ids = view.input_ids[tokens]
    lengths = text.sizes(ids)
    for r in np.unique(reply[reply >= 0]):
        members = np.flatnonzero(reply == r)
        special = np.flatnonzero(lengths[members] < 0)
        members = members[: special[0]] if len(special) else members
        if not len(members):
            continue
        first = members[0]
        piece = text.pieces[int(ids[first])] or b""
        if rel[first] < 0:  # a whitespace token ending where the reply starts
            lead = len(piece)
        else:  # a token starting in template text ('▁Hello' over the template's space)
            before = int(view.reply_spans[r, 0] - view.token_offsets[tokens[first], 0])
            chars = piece.decode("utf-8", "surrogateescape")[: max(before, 0)]
            lead = len(chars.encode("utf-8", "surrogateescape"))
        sizes = lengths[members]
        starts[members] = np.cumsum(sizes) - sizes - lead
        joined = b"".join(text.pieces[int(i)] for i in ids[members])
        spelled[int(r)] = (joined[:lead], joined[lead:])
    return reply, starts, spelled


@dataclass(frozen=True)
class Plan:
    """Per pivot trained position: the source position whose distribution is used (-1:
    none), the rule, and for projected positions the length in bytes of u."""

    source: np.ndarray  # int64
    rule: np.ndarray  # uint8: FALLBACK, BOUNDARY, PROJECTED
    prefix: np.ndarray  # int64, 0 unless projected


def boundary_plan(source_positions: np.ndarray) -> Plan:
    """The character-span (or DTW, or identity) result as a plan: boundary or fallback."""
    rule = np.where(source_positions >= 0, BOUNDARY, FALLBACK).astype(np.uint8)
    return Plan(source_positions, rule, np.zeros(len(source_positions), dtype=np.int64))


def projection_plan(
    pivot: TokenView, source: TokenView, by_chars: np.ndarray, piv_text: PieceBytes, src_text: PieceBytes
) -> Plan:
    """`boundary_plan` of ``by_chars`` (the `fusion.align.positions.offsets_alignment` result), decided
    again in bytes inside every reply both sides spell alike: the source token starting at
    the pivot token's first byte (boundary), else the one covering it (projected)."""
    plan = boundary_plan(by_chars)
    source_pos, rule, prefix = plan.source.copy(), plan.rule.copy(), plan.prefix.copy()
    p_tok, s_tok = pivot.positions + 1, source.positions + 1
    p_reply, p_start, p_bytes = byte_starts(pivot, p_tok, piv_text)
    s_reply, s_start, s_bytes = byte_starts(source, s_tok, src_text)
    first = {r: -_shared_suffix(lead, s_bytes[r][0]) for r, (lead, text) in p_bytes.items()
             if r in s_bytes and s_bytes[r][1] == text}
    alike = np.array(sorted(first), dtype=np.int64)
    lowest = np.array([first.get(int(r), 0) for r in p_reply], dtype=np.int64)
    decide = np.flatnonzero(np.isin(p_reply, alike) & (p_start >= lowest))
    s_len = src_text.sizes(source.input_ids[s_tok])
    usable = np.flatnonzero(np.isin(s_reply, alike) & (s_start != _UNKNOWN) & (s_len > 0))
    if not len(decide) or not len(usable):
        return plan
    s_keys = s_reply[usable] * _REPLY_STRIDE + s_start[usable] + _START_OFFSET
    p_keys = p_reply[decide] * _REPLY_STRIDE + p_start[decide] + _START_OFFSET
    at = np.searchsorted(s_keys, p_keys, side="right") - 1
    found = at >= 0
    at = np.maximum(at, 0)
    offset = p_keys - s_keys[at]
    exact = found & (offset == 0)
    inside = found & (offset > 0) & (offset < s_len[usable][at])
    chosen = s_tok[usable][at] - 1
    source_pos[decide] = np.where(exact | inside, chosen, -1)
    rule[decide] = np.where(exact, BOUNDARY, np.where(inside, PROJECTED, FALLBACK))
    prefix[decide] = np.where(inside, offset, 0)
    return Plan(source_pos, rule, prefix)


def _shared_suffix(a: bytes, b: bytes) -> int:
    """How many final bytes ``a`` and ``b`` share: the template text in front of a reply that
    both sides' tokens cover alike (the same template's space; none for ' ' vs '\\n')."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


_INCONSISTENT, _RESIDUAL = -1, -2


@dataclass
class Projector:
    """Where a source token goes once a prefix of it is emitted, memoised per (token, prefix
    length): the same pieces recur all through a corpus."""

    source: PieceBytes
    pivot: PieceBytes
    src2piv: np.ndarray  # the vocabulary map, for remainders no pivot piece starts
    _memo: dict[tuple[int, int], int] = field(default_factory=dict)

    def target(self, sid: int, prefix: bytes) -> int:
        """The pivot id the rest of source token ``sid`` after ``prefix`` starts with;
        _INCONSISTENT if the token does not start with ``prefix``, _RESIDUAL if it is it."""
        piece = self.source.pieces[sid] if sid < len(self.source.pieces) else None
        if piece is None or not piece.startswith(prefix):
            return _INCONSISTENT
        key = (sid, len(prefix))  # the token and the length determine the prefix
        found = self._memo.get(key)
        if found is None:
            rest = piece[len(prefix):]
            found = self.pivot.first_token(rest) if rest else _RESIDUAL
            if found == -1:  # no pivot piece starts the rest
                found = int(self.src2piv[sid])
            self._memo[key] = found
        return found


def project_distribution(
    ids: np.ndarray,
    logprobs: np.ndarray,
    gold: tuple[int, float],
    prefix: bytes,
    projector: Projector,
    k: int,
) -> tuple[np.ndarray, np.ndarray, int, float]:
    """The source's stored entries (top-K plus ``gold``, the (id, log-probability) of the
    token it emitted) conditioned on having emitted ``prefix``, in pivot ids.

    Returns (ids, logprobs) padded to ``k`` as `fusion.align.positions.merge_distribution` does, the
    number of surviving entries, and the residual mass (probability of the entries that end
    exactly after ``prefix``). No survivor gives zero entries: the caller falls back.
    """
    valid = np.isfinite(logprobs)
    sids, lps = ids[valid].tolist(), logprobs[valid].astype(np.float64).tolist()
    if math.isfinite(gold[1]) and int(gold[0]) not in sids:
        sids.append(int(gold[0]))
        lps.append(float(gold[1]))
    mapped: list[int] = []
    kept: list[float] = []
    residual = 0.0
    for sid, lp in zip(sids, lps, strict=True):
        target = projector.target(sid, prefix)
        if target >= 0:
            mapped.append(target)
            kept.append(lp)
        elif target == _RESIDUAL:
            residual += math.exp(lp)
    out_ids, out_lp, _ = merge_distribution(np.asarray(mapped, dtype=np.int64), np.asarray(kept), k)
    return out_ids, out_lp, len(kept), residual
