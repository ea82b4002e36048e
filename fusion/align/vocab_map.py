"""Source-to-pivot vocabulary maps: which pivot token stands for each source token.

A source model's top-K next-token distribution is translated into the pivot's vocabulary
through ``src2piv`` (index = source id, value = pivot id). Pieces of different tokenizers
are compared by their *canonical text* (:func:`canonical_piece`), not by raw vocabulary
strings, so 'Ġthe' (byte-level), '▁the' (SentencePiece) and ' the' all meet, and so do
'Ċ' and '<0x0A>'.

Canonical text
    '▁' (or the tokenizer's Metaspace marker) becomes ' '; a byte-level (GPT-2
    bytes-to-unicode) piece becomes the UTF-8 text of its bytes; a SentencePiece byte
    piece '<0xNN>' becomes its byte. Bytes that are not valid UTF-8 on their own (half a
    multi-byte character) are written '<0xNN>', upper-case hex, one per byte, e.g. 'Ã'
    (byte 0xC3) and '<0xC3>' are both '<0xC3>', and 'ĠÃ' is ' <0xC3>'. That spelling,
    unlike the latin-1 string of the bytes, cannot collide with real text such as 'Ã'.
    Special and other added tokens ('<s>', '<|im_end|>') are literal text and stay as
    they are. Whether a tokenizer is byte-level is read from its backend pre-tokenizer
    and decoder (the vocabulary alone cannot tell), and its space marker from the
    Metaspace/Replace steps or, failing that, from the vocabulary; the reference looks the
    marker up by tokenizer class, which is wrong for plain ``PreTrainedTokenizerFast``.

Every mode starts with an **exact match**: the pivot token with the same canonical text.
Where several pivot tokens share a text ('\\n' and '<0x0A>' in a SentencePiece vocabulary),
the one with the same raw piece wins (so identical tokenizers give the identity map),
then a non-byte-fallback piece (the one the pivot model actually predicts), then the lower
id. Then, for tokens without an exact match:

``em`` (exact match; the reference's ``hard``)
    the default token. The reference leaves such rows empty; a default keeps every source
    id mappable.
``mined`` (minimum edit distance; FuseLLM's MinED)
    the pivot token at the least Levenshtein distance between canonical texts, searched
    over the whole pivot vocabulary; ties go to the shorter pivot text, then the lower id
    (one candidate per pivot text, chosen as for exact matches).
    The reference's branch does not run, so this is a new implementation.
``ms`` (mapping statistics; the reference's default, what FuseChat used)
    among the pivot tokens that co-occur with the source token in the aligned corpus
    (:class:`CooccurrenceCounts`), the one with the least
    d = lev(strip(src), strip(piv)) * (0.1 if one stripped text contains the other else 1),
    strip removing leading/trailing spaces (the reference strips the space markers).
    Ties go to the *more frequent* pair, then the lower id. The reference multiplies d by
    sigmoid(count), which on a tie favours the rarer pair, most likely by accident. Two
    further differences: an empty stripped text (a pure-space piece) is not a substring of
    everything, since the reference's rule makes ' ' look close to any long piece; and
    the count matrix is sparse (the reference's dense float64 matrix is 39 GB for Qwen).
    A source token with no co-occurring candidate gets the default.

In ``mined`` and ``ms`` a non-exact match never crosses the special/ordinary line: text is
not mapped to a control token such as EOS, nor a control token to text.

The **default** is the pivot's unk token, else its eos token. Source bos and eos always map
to pivot bos and eos where both exist, as in the reference.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import scipy.sparse as sp

from fusion.artifacts.logit_store import tokenizer_fingerprint
from fusion.artifacts.vocab_map_file import MODES, VocabMap

__all__ = ["MODES", "VocabMap", "build_vocab_map"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_FLUSH_PAIRS = 1 << 22  # pending pairs before CooccurrenceCounts folds them in (memory bound)
_CDIST_CELLS = 1 << 25  # distance-matrix cells per MinED chunk (128 MiB of int32)


# --- canonical text --------------------------------------------------------------------


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's bytes-to-unicode table, reversed: the byte each stand-in character encodes.

    Printable latin-1 bytes stand for themselves; the other 68 are shifted to U+0100 on,
    in byte order (so ' ' is 'Ġ' and '\\n' is 'Ċ').
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if chr(b) not in table]
    table.update({chr(0x100 + n): b for n, b in enumerate(shifted)})
    return table


def bytes_text(data: bytes) -> str:
    """UTF-8 text of ``data``, with each byte that is not part of a valid character as '<0xNN>'."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="surrogateescape")  # bad byte b -> U+DC00 + b
        return "".join(
            f"<0x{ord(c) - 0xDC00:02X}>" if "\udc80" <= c <= "\udcff" else c for c in text
        )


def piece_bytes(piece: str, *, byte_level: bool = False, marker: str | None = "▁") -> bytes | None:
    """The bytes a raw vocabulary piece stands for (what it adds to the text), or None for a
    byte-level-vocabulary piece outside the byte alphabet (an added token stored there).

    The byte-prefix projection (`fusion.align.projection`) compares tokens of two tokenizers by
    these bytes: a multi-byte character split into byte pieces by one tokenizer is a prefix
    of the other's whole-character token. Arguments as in :func:`canonical_piece`.
    """
    if byte_level:
        alphabet = byte_level_alphabet()
        return bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else None
    byte = _BYTE_PIECE.fullmatch(piece)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return (piece.replace(marker, " ") if marker else piece).encode("utf-8", "surrogatepass")


def canonical_piece(piece: str, *, byte_level: bool = False, marker: str | None = "▁") -> str:
    """The text a raw vocabulary piece stands for, comparable across tokenizers.

    ``byte_level`` says the piece comes from a byte-level tokenizer (only the tokenizer can
    say so, see :func:`piece_style`); ``marker`` is a non-byte-level tokenizer's space
    marker. Pass special/added tokens through untouched: they are literal text
    (:func:`piece_texts` does).
    """
    data = piece_bytes(piece, byte_level=byte_level, marker=marker)
    return piece if data is None else bytes_text(data)


def _nodes(node: Any) -> Iterator[dict]:
    """Every JSON object inside a tokenizer component (Sequence steps included)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _nodes(value)


def _marker_from_steps(definition: dict) -> str | None:
    """The space marker named by Metaspace or Replace(' ' <-> marker) steps, if any."""
    for part in ("pre_tokenizer", "normalizer", "decoder"):
        for node in _nodes(definition.get(part)):
            if node.get("type") == "Metaspace":
                return node.get("replacement")
            if node.get("type") == "Replace":
                pattern = (node.get("pattern") or {}).get("String")
                if part == "decoder" and node.get("content") == " " and pattern:
                    return pattern
                if part == "normalizer" and pattern == " " and node.get("content"):
                    return node["content"]
    return None


def _marker_by_vote(pieces: Sequence[str | None]) -> str | None:
    """The more common of '▁' and 'Ġ' as a piece's first character, or None if neither is."""
    votes = {m: sum(1 for p in pieces if p and p.startswith(m)) for m in ("▁", "Ġ")}
    best = max(votes, key=lambda m: votes[m])
    return best if votes[best] else None


def piece_style(tokenizer) -> tuple[bool, str | None]:
    """(byte_level, marker) of a tokenizer, read from its definition rather than its class."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: GPT-2 style ones carry their byte table
        if hasattr(tokenizer, "byte_encoder"):
            return True, None
        return False, _marker_by_vote(list(tokenizer.get_vocab()))
    definition = json.loads(backend.to_str())
    parts = (definition.get("pre_tokenizer"), definition.get("decoder"))
    if any(n.get("type") == "ByteLevel" for n in _nodes(list(parts))):
        return True, None
    marker = _marker_from_steps(definition)
    return False, marker if marker else _marker_by_vote(list(tokenizer.get_vocab()))


@dataclass(frozen=True)
class Vocabulary:
    """What mapping needs of one tokenizer: raw pieces, their canonical texts, token classes.

    ``texts[i]`` is '' where id i has no piece (a hole in the vocabulary): '' never matches.
    """

    raw: list[str | None]
    texts: list[str]
    pieces: list[bytes | None]  # bytes of each id (`piece_bytes`); None: special/added or no piece
    special: np.ndarray  # bool (n,)
    byte_piece: np.ndarray  # bool (n,): a '<0xNN>' byte-fallback piece
    bos: int | None
    eos: int | None
    unk: int | None
    fingerprint: str

    def __len__(self) -> int:
        return len(self.texts)


def special_ids(tokenizer) -> set[int]:
    """Ids of special tokens: the named ones plus added tokens flagged special."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return ids | {int(i) for i, token in added.items() if getattr(token, "special", False)}


def vocabulary(tokenizer) -> Vocabulary:
    """Canonical texts and token classes for every id of ``tokenizer``."""
    byte_level, marker = piece_style(tokenizer)
    n = len(tokenizer)
    raw = list(tokenizer.convert_ids_to_tokens(list(range(n))))
    added = {int(i) for i in (getattr(tokenizer, "added_tokens_decoder", {}) or {})}
    special = special_ids(tokenizer)
    pieces = [
        None if p is None or i in added else piece_bytes(p, byte_level=byte_level, marker=marker)
        for i, p in enumerate(raw)
    ]
    texts = [
        "" if p is None else p if b is None else bytes_text(b) for p, b in zip(raw, pieces, strict=True)
    ]
    is_byte_piece = [
        not byte_level and p is not None and i not in added and bool(_BYTE_PIECE.fullmatch(p))
        for i, p in enumerate(raw)
    ]
    return Vocabulary(
        raw=raw,
        texts=texts,
        pieces=pieces,
        special=np.array([i in special for i in range(n)], dtype=bool),
        byte_piece=np.array(is_byte_piece, dtype=bool),
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        unk=tokenizer.unk_token_id,
        fingerprint=tokenizer_fingerprint(tokenizer),
    )


def piece_texts(tokenizer) -> list[str]:
    """Canonical text of every id of ``tokenizer`` ('' for an id without a piece)."""
    return vocabulary(tokenizer).texts


def as_vocabulary(tokenizer_or_vocabulary) -> Vocabulary:
    """A `Vocabulary` as is, a tokenizer read into one (built once per run, then reused)."""
    if isinstance(tokenizer_or_vocabulary, Vocabulary):
        return tokenizer_or_vocabulary
    return vocabulary(tokenizer_or_vocabulary)


# --- co-occurrence counts --------------------------------------------------------------


def _check_ids(ids: np.ndarray, size: int, name: str) -> np.ndarray:
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= size):
        raise ValueError(f"{name} out of range [0, {size}): min {ids.min()}, max {ids.max()}")
    return ids.astype(np.int64, copy=False)


def _sum_by_key(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and the summed counts of each (exact integer sums)."""
    if not keys.size:
        return keys, counts
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[starts], np.add.reduceat(counts, starts)


class CooccurrenceCounts:
    """Sparse counts of aligned (pivot id, source id) pairs over a corpus.

    Pairs are kept as sorted int64 keys ``pivot * source_vocab + source`` with counts, never
    as a dense |V_piv| x |V_src| matrix (the reference's is 39 GB for Qwen). ``add`` only
    buffers; buffers are folded in every ``_FLUSH_PAIRS`` pairs, so memory follows the
    number of distinct pairs.
    """

    def __init__(self, pivot_vocab: int, source_vocab: int):
        if pivot_vocab <= 0 or source_vocab <= 0:
            raise ValueError(
                f"vocabulary sizes must be positive, got {pivot_vocab}, {source_vocab}"
            )
        self.pivot_vocab = int(pivot_vocab)
        self.source_vocab = int(source_vocab)
        self._keys = np.empty(0, dtype=np.int64)
        self._counts = np.empty(0, dtype=np.int64)
        self._pending: list[np.ndarray] = []
        self._pending_pairs = 0

    def add(self, pivot_ids: np.ndarray, source_ids: np.ndarray) -> None:
        """Count each aligned pair once (repeated pairs add up)."""
        piv = _check_ids(np.asarray(pivot_ids), self.pivot_vocab, "pivot_ids")
        src = _check_ids(np.asarray(source_ids), self.source_vocab, "source_ids")
        if piv.shape != src.shape:
            raise ValueError(
                f"pivot_ids and source_ids differ in length: {piv.shape} vs {src.shape}"
            )
        self._pending.append(piv * self.source_vocab + src)
        self._pending_pairs += piv.size
        if self._pending_pairs >= _FLUSH_PAIRS:
            self._fold()

    def _fold(self) -> None:
        if not self._pending:
            return
        new = np.concatenate(self._pending)
        self._pending, self._pending_pairs = [], 0
        self._keys, self._counts = _sum_by_key(
            np.concatenate([self._keys, new]),
            np.concatenate([self._counts, np.ones(new.size, dtype=np.int64)]),
        )

    @property
    def nnz(self) -> int:
        """Distinct pairs seen."""
        self._fold()
        return int(self._keys.size)

    def matrix(self) -> sp.csr_matrix:
        """counts[s, t]: how often source id s was aligned to pivot id t; (source_vocab, pivot_vocab)."""
        self._fold()
        rows, cols = self._keys % self.source_vocab, self._keys // self.source_vocab
        return sp.csr_matrix(
            (self._counts, (rows, cols)),
            shape=(self.source_vocab, self.pivot_vocab),
            dtype=np.int64,
        )


# --- the map ---------------------------------------------------------------------------


def preferred_ids(piv: Vocabulary) -> dict[str, int]:
    """One pivot id per canonical text: not a byte-fallback piece if possible, then the lowest id."""
    by_text: dict[str, int] = {}
    for t in sorted(range(len(piv)), key=lambda i: (bool(piv.byte_piece[i]), i)):
        if piv.texts[t]:
            by_text.setdefault(piv.texts[t], t)
    return by_text


def exact_matches(src: Vocabulary, piv: Vocabulary) -> np.ndarray:
    """Pivot id with the same canonical text for each source id, -1 where none.

    Among pivot ids sharing a text, the one with the same raw piece comes first, then
    :func:`preferred_ids`' choice.
    """
    by_text = preferred_ids(piv)
    by_piece = {(text, piv.raw[t]): t for t, text in enumerate(piv.texts) if text}
    out = np.full(len(src), -1, dtype=np.int64)
    for s, text in enumerate(src.texts):
        if text:
            out[s] = by_piece.get((text, src.raw[s]), by_text.get(text, -1))
    return out


def _rapidfuzz():
    try:
        from rapidfuzz import process
        from rapidfuzz.distance import Levenshtein
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'mined' and 'ms' vocab maps need rapidfuzz: pip install rapidfuzz"
        ) from exc
    return process, Levenshtein


def nearest_texts(queries: Sequence[str], choices: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the index of the choice at the least Levenshtein distance, and that distance.

    Ties go to the shorter choice, then the lower index. All pairs are scored (rapidfuzz's
    bit-parallel cdist on all cores), in chunks that bound memory.
    """
    process, levenshtein = _rapidfuzz()
    if not choices:
        raise ValueError("no choices to match against")
    # argmin keeps the first of equal distances, so rank choices by (length, index)
    order = sorted(range(len(choices)), key=lambda i: (len(choices[i]), i))
    ranked = [choices[i] for i in order]
    best = np.empty(len(queries), dtype=np.int64)
    dist = np.empty(len(queries), dtype=np.int64)
    step = max(1, _CDIST_CELLS // len(ranked))
    for start in range(0, len(queries), step):
        block = process.cdist(
            queries[start : start + step],
            ranked,
            scorer=levenshtein.distance,
            dtype=np.int32,
            workers=-1,
        )
        arg = block.argmin(axis=1)
        best[start : start + step] = arg
        dist[start : start + step] = block[np.arange(len(arg)), arg]
    return np.asarray(order, dtype=np.int64)[best], dist


def mined_matches(src: Vocabulary, piv: Vocabulary, todo: np.ndarray) -> np.ndarray:
    """Minimum-edit-distance pivot id for the source ids ``todo`` (-1 where no candidate).

    Candidates are one id per pivot text (:func:`preferred_ids`): '<0x20>' never stands in
    for '▁' just because its id is lower.
    """
    out = np.full(todo.size, -1, dtype=np.int64)
    preferred = sorted(preferred_ids(piv).values())
    for special in (False, True):
        rows = [k for k, s in enumerate(todo) if src.special[s] == special]
        cands = [t for t in preferred if piv.special[t] == special]
        if rows and cands:
            found, _ = nearest_texts(
                [src.texts[todo[k]] for k in rows], [piv.texts[t] for t in cands]
            )
            out[rows] = np.asarray(cands, dtype=np.int64)[found]
    return out


def ms_distance(src_text: str, piv_texts: Sequence[str]) -> np.ndarray:
    """The reference's d(t), times 10 so it stays an integer (0.1 -> 1, 1 -> 10).

    d = lev(strip(a), strip(b)) * (0.1 if one stripped text contains the other else 1);
    an empty stripped text counts as contained in nothing.
    """
    process, levenshtein = _rapidfuzz()
    a = src_text.strip(" ")
    bs = [t.strip(" ") for t in piv_texts]
    lev = process.cdist([a], bs, scorer=levenshtein.distance, dtype=np.int64)[0]
    within = np.array([bool(a) and bool(b) and (a in b or b in a) for b in bs], dtype=bool)
    return lev * np.where(within, 1, 10)


def ms_matches(
    src: Vocabulary, piv: Vocabulary, todo: np.ndarray, counts: sp.csr_matrix
) -> np.ndarray:
    """Statistics-based pivot id for the source ids ``todo``: least d, then most counts, then lowest id."""
    out = np.full(todo.size, -1, dtype=np.int64)
    n_piv = len(piv)
    for k, s in enumerate(todo):
        lo, hi = counts.indptr[s], counts.indptr[s + 1]
        cols, freq = counts.indices[lo:hi].astype(np.int64), counts.data[lo:hi]
        keep = cols < n_piv
        cols, freq = cols[keep], freq[keep]
        keep = np.array(
            [bool(piv.texts[t]) and piv.special[t] == src.special[s] for t in cols], dtype=bool
        )
        cols, freq = cols[keep], freq[keep]
        if cols.size:
            d = ms_distance(src.texts[s], [piv.texts[t] for t in cols])
            out[k] = cols[np.lexsort((cols, -freq, d))[0]]
    return out


def build_vocab_map(
    source_tokenizer: Any,
    pivot_tokenizer: Any,
    *,
    mode: str = "ms",
    counts: CooccurrenceCounts | None = None,
    source_vocab_size: int | None = None,
) -> VocabMap:
    """Map every source id to a pivot id (see the module docstring for the modes).

    The tokenizers may be given as their `Vocabulary` (`as_vocabulary`).

    The map covers ``source_vocab_size`` ids (default: ``counts.source_vocab`` if given,
    else ``len(source_tokenizer)``); pass the source model's vocabulary size when it is
    larger than the tokenizer's, so padded ids the model can still emit map to the default.
    """
    if mode not in MODES:
        raise ValueError(f"unknown vocab map mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "ms" and counts is None:
        raise ValueError("mode 'ms' needs co-occurrence counts (counts=CooccurrenceCounts)")
    src, piv = as_vocabulary(source_tokenizer), as_vocabulary(pivot_tokenizer)
    n_src = source_vocab_size or (counts.source_vocab if counts is not None else len(src))
    if n_src < len(src):
        raise ValueError(f"the map must cover the source tokenizer's {len(src)} ids, not {n_src}")
    if counts is not None and counts.source_vocab != n_src:
        raise ValueError(f"counts cover {counts.source_vocab} source ids, the map {n_src}")
    default = piv.unk if piv.unk is not None else piv.eos
    if default is None:
        raise ValueError(
            "the pivot tokenizer has neither an unk nor an eos token to map unknowns to"
        )

    found = np.full(n_src, -1, dtype=np.int64)
    found[: len(src)] = exact_matches(src, piv)
    exact = found >= 0
    todo = np.flatnonzero(~exact[: len(src)] & np.array([bool(t) for t in src.texts], dtype=bool))
    if mode == "mined":
        found[todo] = mined_matches(src, piv, todo)
    elif mode == "ms":
        found[todo] = ms_matches(src, piv, todo, counts.matrix())
    src2piv = np.where(found >= 0, found, default)
    for s, t in ((src.bos, piv.bos), (src.eos, piv.eos)):
        if s is not None and t is not None:
            src2piv[s] = t
            exact[s] = src.texts[s] == piv.texts[t]
    return VocabMap(src2piv, mode, src.fingerprint, piv.fingerprint, exact)
