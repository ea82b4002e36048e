"""Vocabulary maps: canonical text, the em / mined / ms modes, counts, and the map file.

The toy tokenizers cover the two real styles (byte-level 'Ġ', SentencePiece '▁' with byte
fallback); small hand-made tokenizers pin down the tie rules. MinED is checked against a
brute-force Levenshtein written here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fusion.align.vocab_map import (
    MODES,
    CooccurrenceCounts,
    VocabMap,
    build_vocab_map,
    byte_level_alphabet,
    canonical_piece,
    piece_style,
    piece_texts,
)
from fusion.artifacts.logit_store import tokenizer_fingerprint

SPECIALS = ("<unk>", "<s>", "</s>")


def word_tokenizer(pieces, *, specials=SPECIALS, marker="▁"):
    """A tiny non-byte-level tokenizer whose vocabulary is exactly ``pieces`` (ids in order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(
        models.WordLevel(vocab={p: i for i, p in enumerate(pieces)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=marker)
    backend.decoder = decoders.Metaspace(replacement=marker)
    backend.add_special_tokens(list(specials))
    named = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, **{k: v for k, v in named.items() if v in pieces}
    )


def levenshtein(a: str, b: str) -> int:
    """Textbook dynamic programme, the brute-force reference for MinED."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def special_set(tokenizer) -> set[int]:
    """Added tokens flagged special ('<|im_start|>' is one, though not in all_special_ids)."""
    return {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def ids_of(tokenizer, *pieces):
    ids = tokenizer.convert_tokens_to_ids(list(pieces))
    assert tokenizer.unk_token_id not in ids or "<unk>" in pieces, pieces
    return ids


# --- canonical text --------------------------------------------------------------------


def test_byte_level_alphabet_is_gpt2_table():
    table = byte_level_alphabet()
    assert sorted(table.values()) == list(range(256))
    assert (table["Ġ"], table["Ċ"], table["ĉ"], table["!"], table["Ã"], table["©"]) == (
        32,
        10,
        9,
        33,
        0xC3,
        0xA9,
    )


@pytest.mark.parametrize(
    ("piece", "byte_level", "text"),
    [
        ("▁the", False, " the"),
        ("▁", False, " "),
        ("Ġthe", True, " the"),
        ("ĠĠ", True, "  "),
        ("Ċ", True, "\n"),
        ("<0x0A>", False, "\n"),
        ("<0x20>", False, " "),
        ("Ã©", True, "é"),
        ("ĠÃ©", True, " é"),
        ("Ã", True, "<0xC3>"),  # half of a two-byte character
        ("<0xC3>", False, "<0xC3>"),
        ("<0xc3>", False, "<0xC3>"),
        ("ĠÃ", True, " <0xC3>"),
        ("ðŁĺĢ", True, "😀"),
        ("ðŁ", True, "<0xF0><0x9F>"),
        ("Ã", False, "Ã"),  # real text in a SentencePiece vocabulary, not a byte
        ("<|im_end|>", True, "<|im_end|>"),
        ("<s>", False, "<s>"),
        ("｜begin▁of▁sentence｜", True, "｜begin▁of▁sentence｜"),  # not byte-encoded: as is
    ],
)
def test_canonical_piece(piece, byte_level, text):
    assert canonical_piece(piece, byte_level=byte_level) == text


def test_canonical_piece_marker():
    assert canonical_piece("Ġcat", marker="Ġ") == " cat"
    assert canonical_piece("Ġcat", marker="▁") == "Ġcat"  # 'Ġ' is a letter (Maltese) here
    assert canonical_piece("▁cat", marker=None) == "▁cat"


def test_piece_style(metaspace_tokenizer, bytelevel_tokenizer):
    assert piece_style(bytelevel_tokenizer) == (True, None)
    assert piece_style(metaspace_tokenizer) == (False, "▁")
    assert piece_style(word_tokenizer(["<unk>", "Ġcat"], marker="Ġ")) == (False, "Ġ")


def test_piece_texts_bytelevel(bytelevel_tokenizer):
    tok = bytelevel_tokenizer
    texts = piece_texts(tok)
    assert len(texts) == len(tok)
    expect = {
        "Ċ": "\n",
        "Ġthe": " the",
        "ĠĠ": "  ",
        "ĠÃ©": " é",
        "ĠÃ": " <0xC3>",
        "<|im_end|>": "<|im_end|>",
    }
    for piece, text in expect.items():
        assert texts[ids_of(tok, piece)[0]] == text
    # Every piece that is whole UTF-8 reads as the tokenizer itself decodes it.
    special = set(tok.all_special_ids)
    for i, text in enumerate(texts):
        if i not in special and "<0x" not in text:
            assert text == tok.decode([i]), (i, text)


def test_piece_texts_metaspace(metaspace_tokenizer):
    tok = metaspace_tokenizer
    texts = piece_texts(tok)
    expect = {"<0x0A>": "\n", "<0x41>": "A", "<0xC3>": "<0xC3>", "▁the": " the", "▁": " ", "é": "é"}
    expect |= {s: s for s in SPECIALS}
    for piece, text in expect.items():
        assert texts[ids_of(tok, piece)[0]] == text


def test_newline_meets_across_styles(metaspace_tokenizer, bytelevel_tokenizer):
    ms, bl = piece_texts(metaspace_tokenizer), piece_texts(bytelevel_tokenizer)
    (nl_ms,) = ids_of(metaspace_tokenizer, "<0x0A>")
    (nl_bl,) = ids_of(bytelevel_tokenizer, "Ċ")
    assert ms[nl_ms] == bl[nl_bl] == "\n"


# --- modes on the toy pair -------------------------------------------------------------


def empty_counts(source, pivot):
    return CooccurrenceCounts(len(pivot), len(source))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["metaspace_tokenizer", "bytelevel_tokenizer"])
def test_identical_tokenizers_give_identity(request, name, mode):
    tok = request.getfixturevalue(name)
    vmap = build_vocab_map(tok, tok, mode=mode, counts=empty_counts(tok, tok))
    np.testing.assert_array_equal(vmap.src2piv, np.arange(len(tok)))
    assert vmap.exact.all()
    assert vmap.mode == mode
    assert vmap.source_fingerprint == vmap.pivot_fingerprint == tokenizer_fingerprint(tok)


def forced(source, pivot) -> dict[int, int]:
    """The bos/eos pairs every mode maps regardless of text."""
    pairs = [(source.bos_token_id, pivot.bos_token_id), (source.eos_token_id, pivot.eos_token_id)]
    return {s: t for s, t in pairs if s is not None and t is not None}


def default_id(pivot) -> int:
    return pivot.unk_token_id if pivot.unk_token_id is not None else pivot.eos_token_id


@pytest.mark.parametrize("direction", ["ms->bl", "bl->ms"])
def test_em_maps_exactly_the_shared_texts(metaspace_tokenizer, bytelevel_tokenizer, direction):
    src, piv = (
        (metaspace_tokenizer, bytelevel_tokenizer)
        if direction == "ms->bl"
        else (bytelevel_tokenizer, metaspace_tokenizer)
    )
    vmap = build_vocab_map(src, piv, mode="em")
    src_texts, piv_texts = piece_texts(src), piece_texts(piv)
    shared = set(piv_texts)
    fixed = forced(src, piv)
    assert vmap.src2piv.shape == (len(src),)
    for s, text in enumerate(src_texts):
        t = vmap.src2piv[s]
        if s in fixed:
            assert t == fixed[s]
        elif text in shared:
            assert vmap.exact[s] and piv_texts[t] == text, (s, text)
        else:
            assert not vmap.exact[s] and t == default_id(piv), (s, text)
    assert 0 < vmap.exact.sum() < len(src)


def test_em_prefers_the_piece_the_pivot_predicts(metaspace_tokenizer, bytelevel_tokenizer):
    """'Ċ' has two exact matches in a SentencePiece vocabulary: '\\n' (a piece) and '<0x0A>'."""
    fwd = build_vocab_map(metaspace_tokenizer, bytelevel_tokenizer, mode="em")
    back = build_vocab_map(bytelevel_tokenizer, metaspace_tokenizer, mode="em")
    (byte_nl,) = ids_of(metaspace_tokenizer, "<0x0A>")
    piece_nl = metaspace_tokenizer.get_vocab()["\n"]
    (bl_nl,) = ids_of(bytelevel_tokenizer, "Ċ")
    assert fwd.src2piv[byte_nl] == fwd.src2piv[piece_nl] == bl_nl
    assert back.src2piv[bl_nl] == piece_nl
    # eos -> eos across different texts; the byte-level pivot has no unk, so eos is the default
    assert fwd.src2piv[metaspace_tokenizer.eos_token_id] == bytelevel_tokenizer.eos_token_id
    assert not fwd.exact[metaspace_tokenizer.eos_token_id]
    assert back.src2piv[bytelevel_tokenizer.eos_token_id] == metaspace_tokenizer.eos_token_id


@pytest.mark.parametrize("direction", ["ms->bl", "bl->ms"])
def test_mined_picks_minimum_distance_on_toy_pair(
    metaspace_tokenizer, bytelevel_tokenizer, direction
):
    src, piv = (
        (metaspace_tokenizer, bytelevel_tokenizer)
        if direction == "ms->bl"
        else (bytelevel_tokenizer, metaspace_tokenizer)
    )
    mined = build_vocab_map(src, piv, mode="mined")
    em = build_vocab_map(src, piv, mode="em")
    np.testing.assert_array_equal(mined.exact, em.exact)
    np.testing.assert_array_equal(mined.src2piv[em.exact], em.src2piv[em.exact])
    src_texts, piv_texts = piece_texts(src), piece_texts(piv)
    src_special, piv_special = special_set(src), special_set(piv)
    fixed = forced(src, piv)
    checked = 0
    for s in np.flatnonzero(~mined.exact):
        if s in fixed:
            continue
        cands = [t for t in range(len(piv)) if (t in piv_special) == (s in src_special)]
        best = min(levenshtein(src_texts[s], piv_texts[t]) for t in cands)
        t = mined.src2piv[s]
        assert levenshtein(src_texts[s], piv_texts[t]) == best, (src_texts[s], piv_texts[t])
        shortest = min(
            len(piv_texts[c]) for c in cands if levenshtein(src_texts[s], piv_texts[c]) == best
        )
        assert len(piv_texts[t]) == shortest
        checked += 1
    assert checked > 5


def test_mined_ties_shorter_then_lower_id():
    pivot = word_tokenizer([*SPECIALS, "▁cat", "▁car", "ca", "cat", "▁dog", "<0x20>", "▁"])
    source = word_tokenizer([*SPECIALS, "▁cat", "▁cax", "cas", "▁dogs", "zz", "▁ca"])
    vmap = build_vocab_map(source, pivot, mode="mined")
    got = dict(
        zip(
            source.convert_ids_to_tokens(list(range(len(source)))),
            vmap.src2piv.tolist(),
            strict=True,
        )
    )
    vocab = pivot.get_vocab()
    assert got["▁cat"] == vocab["▁cat"] and vmap.exact[source.get_vocab()["▁cat"]]
    assert got["▁cax"] == vocab["▁cat"]  # distance 1 to '▁cat' and '▁car', same length: lower id
    assert got["cas"] == vocab["ca"]  # distance 1 to 'ca' and 'cat': the shorter
    assert got["▁dogs"] == vocab["▁dog"]
    # distance 2 to every 1-char text: '▁', not its lower-id byte twin '<0x20>'
    assert got["zz"] == vocab["▁"]
    assert got["▁ca"] == vocab["ca"]  # 'ca' and '▁cat' and '▁car' are at 1: 'ca' is shortest
    assert not vmap.exact[
        [source.get_vocab()[p] for p in ("▁cax", "cas", "▁dogs", "zz", "▁ca")]
    ].any()


# --- mapping statistics ----------------------------------------------------------------

MS_PIVOT = [*SPECIALS, "▁he", "▁the", "abc", "abe", "help", "hell", "▁"]
MS_SOURCE = [*SPECIALS, "▁the", "abd", "hello", "zzz", "<ctl>", "Hello"]


@pytest.fixture(scope="module")
def ms_pair():
    pivot = word_tokenizer(MS_PIVOT)
    source = word_tokenizer(MS_SOURCE, specials=(*SPECIALS, "<ctl>"))
    piv, src = pivot.get_vocab(), source.get_vocab()
    counts = CooccurrenceCounts(len(pivot), len(source))
    pairs = [
        ("▁he", "▁the", 100),  # exact match beats any count
        ("abc", "abd", 1),
        ("abe", "abd", 5),  # distance tie: the frequent pair
        ("help", "hello", 100),
        ("hell", "hello", 1),  # distance beats count (substring: 0.1)
        ("abc", "<ctl>", 50),  # a control token is not mapped to text
        ("▁", "Hello", 10),
        ("help", "Hello", 1),  # ' ' is not "contained" in everything
    ]
    for p, s, n in pairs:
        counts.add(np.full(n, piv[p]), np.full(n, src[s]))
    return source, pivot, counts


def reference_pick(src_text: str, cands: dict[str, int]) -> str:
    """FuseChat's rule: argmin d * sigmoid(count), with '' contained in everything."""

    def score(piv_text: str) -> float:
        a, b = src_text.strip(" ▁"), piv_text.strip(" ▁")  # the space marker stripped
        d = levenshtein(a, b) * (0.1 if a in b or b in a else 1.0)
        return d / (1 + math.exp(-cands[piv_text]))

    return min(cands, key=score)


def test_ms_rules(ms_pair):
    source, pivot, counts = ms_pair
    vmap = build_vocab_map(source, pivot, mode="ms", counts=counts)
    piv, src = pivot.get_vocab(), source.get_vocab()
    got = {s: vmap.src2piv[i] for s, i in src.items()}
    assert got["▁the"] == piv["▁the"] and vmap.exact[src["▁the"]]
    assert got["abd"] == piv["abe"]
    assert reference_pick("abd", {"abc": 1, "abe": 5}) == "abc"  # the rule fixed here
    assert got["hello"] == piv["hell"]
    assert got["zzz"] == pivot.unk_token_id  # never aligned: default
    assert got["<ctl>"] == pivot.unk_token_id
    assert got["Hello"] == piv["help"]
    assert reference_pick("Hello", {"▁": 10, "help": 1}) == "▁"
    assert not vmap.exact[[src[s] for s in ("abd", "hello", "zzz", "<ctl>", "Hello")]].any()
    for s in SPECIALS:
        assert got[s] == piv[s] and vmap.exact[src[s]]


def test_ms_distance_tie_lower_id_when_counts_tie(ms_pair):
    source, pivot, _ = ms_pair
    piv, src = pivot.get_vocab(), source.get_vocab()
    counts = CooccurrenceCounts(len(pivot), len(source))
    counts.add(np.array([piv["abe"], piv["abc"]]), np.array([src["abd"]] * 2))
    vmap = build_vocab_map(source, pivot, mode="ms", counts=counts)
    assert vmap.src2piv[src["abd"]] == piv["abc"]


def test_ms_needs_matching_counts(ms_pair):
    source, pivot, counts = ms_pair
    with pytest.raises(ValueError, match="counts"):
        build_vocab_map(source, pivot, mode="ms")
    with pytest.raises(ValueError, match="cover"):
        build_vocab_map(source, pivot, mode="ms", counts=counts, source_vocab_size=len(source) + 3)
    with pytest.raises(ValueError, match="unknown vocab map mode"):
        build_vocab_map(source, pivot, mode="soft")


def test_model_vocab_larger_than_tokenizer(ms_pair):
    """Padded model ids (no piece) still map, to the default."""
    source, pivot, _ = ms_pair
    vmap = build_vocab_map(source, pivot, mode="em", source_vocab_size=len(source) + 4)
    assert vmap.src2piv.shape == (len(source) + 4,)
    assert (vmap.src2piv[len(source) :] == pivot.unk_token_id).all()
    assert not vmap.exact[len(source) :].any()
    counts = CooccurrenceCounts(len(pivot) + 2, len(source) + 4)
    assert build_vocab_map(source, pivot, counts=counts).src2piv.shape == (len(source) + 4,)


# --- counts ----------------------------------------------------------------------------


def test_counts_accumulate_duplicates():
    counts = CooccurrenceCounts(pivot_vocab=4, source_vocab=3)
    counts.add(np.array([1, 1, 2, 1]), np.array([0, 0, 2, 0]))
    counts.add(np.array([1]), np.array([0]))
    counts.add(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    m = counts.matrix()
    assert m.shape == (3, 4) and m.nnz == 2
    assert m[0, 1] == 4 and m[2, 2] == 1


@pytest.mark.parametrize("flush", [1, 7, 1 << 22])
def test_counts_match_dense(monkeypatch, flush):
    monkeypatch.setattr("fusion.align.vocab_map._FLUSH_PAIRS", flush)
    rng = np.random.default_rng(0)
    n_piv, n_src = 37, 23
    counts = CooccurrenceCounts(n_piv, n_src)
    dense = np.zeros((n_src, n_piv), dtype=np.int64)
    for _ in range(20):
        p, s = rng.integers(0, n_piv, 50), rng.integers(0, n_src, 50)
        counts.add(p, s)
        np.add.at(dense, (s, p), 1)
    np.testing.assert_array_equal(counts.matrix().toarray(), dense)
    assert counts.nnz == np.count_nonzero(dense)


def test_counts_reject_bad_ids():
    counts = CooccurrenceCounts(4, 3)
    with pytest.raises(ValueError, match="out of range"):
        counts.add(np.array([4]), np.array([0]))
    with pytest.raises(ValueError, match="out of range"):
        counts.add(np.array([0]), np.array([-1]))
    with pytest.raises(ValueError, match="length"):
        counts.add(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match="integer"):
        counts.add(np.array([0.5]), np.array([0]))


# --- the map file ----------------------------------------------------------------------


def test_vocab_map_round_trip(tmp_path, metaspace_tokenizer, bytelevel_tokenizer):
    vmap = build_vocab_map(metaspace_tokenizer, bytelevel_tokenizer, mode="mined")
    path = tmp_path / "vocab_map.json"
    vmap.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["vocab_map.json"]
    assert json.loads(path.read_text())["mode"] == "mined"
    loaded = VocabMap.load(
        path,
        source_fingerprint=tokenizer_fingerprint(metaspace_tokenizer),
        pivot_fingerprint=tokenizer_fingerprint(bytelevel_tokenizer),
    )
    np.testing.assert_array_equal(loaded.src2piv, vmap.src2piv)
    np.testing.assert_array_equal(loaded.exact, vmap.exact)
    assert loaded.src2piv.dtype == np.int64 and loaded.exact.dtype == bool
    assert (loaded.mode, loaded.source_fingerprint, loaded.pivot_fingerprint) == (
        vmap.mode,
        vmap.source_fingerprint,
        vmap.pivot_fingerprint,
    )


def test_vocab_map_refuses_other_tokenizers(tmp_path, metaspace_tokenizer, bytelevel_tokenizer):
    vmap = build_vocab_map(metaspace_tokenizer, bytelevel_tokenizer, mode="em")
    path = tmp_path / "vocab_map.json"
    vmap.save(path)
    src_fp, piv_fp = (
        tokenizer_fingerprint(metaspace_tokenizer),
        tokenizer_fingerprint(bytelevel_tokenizer),
    )
    with pytest.raises(ValueError) as err:
        VocabMap.load(path, source_fingerprint=piv_fp, pivot_fingerprint=src_fp)  # swapped
    message = str(err.value)
    assert str(path) in message and src_fp in message and piv_fp in message
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="other.json"):
        VocabMap.load(tmp_path / "other.json", source_fingerprint=src_fp, pivot_fingerprint=piv_fp)


def test_vocab_map_validates_fields():
    with pytest.raises(ValueError, match="mode"):
        VocabMap(np.arange(3), "hard", "a", "b", np.ones(3, bool))
    with pytest.raises(ValueError, match="one length"):
        VocabMap(np.arange(3), "em", "a", "b", np.ones(2, bool))
